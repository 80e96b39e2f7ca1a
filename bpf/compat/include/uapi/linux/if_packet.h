/* bcc includes uapi/linux/if_packet.h from its helpers; nothing from it is used. */
