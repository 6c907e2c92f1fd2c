"""deltahub: compress full-parameter fine-tunes into small deltas over their base model,
share them on the Hugging Face Hub, and serve many of them on one resident base."""

__version__ = "0.1.0"
