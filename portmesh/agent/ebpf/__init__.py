"""The eBPF datapath: tc programs on a host's ports, filled from the same desired state as the OVS pipeline.

``datapath.bpf.c`` is the program, ``datapath.h`` the maps' layout (``layout.py`` mirrors
it), ``build`` compiles it, ``loader`` loads, pins and attaches it, ``compile`` turns the
desired state into map entries, ``sync`` writes the difference.
"""
