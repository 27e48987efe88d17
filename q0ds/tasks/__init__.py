"""Shipped lm-evaluation-harness tasks (q0ds_mc, q0ds_ppl): YAMLs, their data and its generator.

Point lm_eval at this directory (`--include_path`, or `TaskManager(include_path=...)`); `q0ds lm-eval`
and `q0ds.lm_eval_adapter.run_lm_eval` do so themselves. See q0ds_taskdata.py for how the data is built.
"""
