"""Data-parallel training over the processes of one host.

- :mod:`.dist`: the process group, the ``torchrun`` launch of ``fbqc train --nproc N``, DDP / FSDP2
  wrapping, each process's slice of a batch, and full (unsharded) checkpoint state.
- :mod:`.shards`: FSDP2's AdamW step and gradient clipping on each process's local shards.
"""
