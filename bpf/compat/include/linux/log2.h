/* bcc includes linux/log2.h from its helpers; nothing from it is used. */
