"""Other libraries' model layouts in and out of dtlab checkpoints: Hugging Face Transformers'
``DecisionTransformerModel`` (``dtlab.interop.huggingface``; ``dtlab interop from-hf/to-hf``)."""
