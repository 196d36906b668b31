"""What depends on the installed versions of torch and DeepSpeed, in one place: `compat.torch` (APIs that differ
between torch releases), `compat.deepspeed` (every DeepSpeed internal bigtrain touches, with a check that
names the ones an installed release lacks), `compat.fairscale` (fairscale's FSDP), `compat.fsdp2` (torch's
`fully_shard`) and `compat.torchao` (torchao's float8 training API, for train.precision=fp8)."""
