"""The multilevel math: the hierarchy of networks coarsened in time and its transfers, the MG/OPT
V-cycle with work units, multilevel initialization, and resolution transfer of conv kernels.
Nothing here communicates: a level reaches other ranks only through its executor."""
