"""The two students QAT trains, and the training loop's adapter to each.

- :mod:`.program`: the program student — the FAKE_QUANT program itself (one process); its training
  view, bit-width buffers and parameter placement.
- :mod:`.modules`: the module student — the same QuantSpecs applied to the eager ``nn.Module`` in place
  (per-block sharding, activation checkpointing, regional ``torch.compile``: DDP/FSDP2).
- :mod:`.adapters`: the same small surface over either (device, optimizer, clipping, checkpoint state),
  what :func:`fbqc.qat.train._run` drives.
"""
