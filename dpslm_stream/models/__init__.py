"""One module per network (nanoGPT style): a config dataclass, the module, checkpoint (de)serialisation."""
