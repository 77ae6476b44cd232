"""Stage one of taps: datasets, backbones and their taps, extraction, the HDF5 store."""
