"""Names and switches shared by the fused-statistics dispatcher (:mod:`.fused_stats`) and its backends."""

# Every statistic, in the order of the returned dicts; the single-model ones; the ones that need the reference
STATS = ("logprob", "ref_logprob", "entropy", "kl", "self_certainty", "topk_confidence")
POLICY_STATS = ("logprob", "entropy", "self_certainty", "topk_confidence")
REFERENCE_STATS = ("ref_logprob", "kl")

BACKENDS = ("auto", "torch", "triton")
# Flip to True once tests/test_kernels_triton.py has passed on a CUDA GPU: then "auto" picks Triton on CUDA.
TRITON_VALIDATED = False
