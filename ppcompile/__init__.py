"""ppcompile: Probe Pruning (ICLR 2025) as a torch.compile pass for Hugging Face causal LMs."""
__version__ = "0.1.0"
