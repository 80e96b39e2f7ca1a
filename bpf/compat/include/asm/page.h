/* bcc includes asm/page.h from its helpers; nothing from it is used. */
