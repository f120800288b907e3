//! Model config, safetensors weights, tokenizer and chat template.
