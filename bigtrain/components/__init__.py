"""Leaf pieces that several layers share, importing nothing above `config`: the loss and its counts
(`loss`), the result of one optimizer step (`step_result`), checkpoint files on disk (`checkpoint`), and
devices and mixed precision (`precision`). Models, parallel code, engines and the training loop all build
on these, as torchtitan's `components/` sit beside its training loop."""
