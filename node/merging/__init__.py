"""Decentralized merging on a node (DIMAT): fetch the neighbours' models, align their hidden
units to this node's (permutation specs, activations, linear assignment), and average."""
