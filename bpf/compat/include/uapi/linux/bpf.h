/* bcc brings its own copy of the BPF UAPI (virtual_bpf.h); this file only has to exist. */
