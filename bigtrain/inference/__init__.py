"""Running a trained model: one-device or tensor-parallel loading of any weights (`load.py`), generation with a
KV cache (`generate.py`: greedy and sampled through `sampling.py`, beam search through `beam.py`, the rows being
decoded in `decoder_rows.py`), and attention maps (`attention_data.py` records and groups them,
`attention_plot.py` draws them, `attention_log.py` puts them into TensorBoard during training), and lm-eval-harness's
model interface (`lm_eval_adapter.py`) over log-likelihoods of continuations (`scoring.py`)."""
