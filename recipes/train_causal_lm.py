"""Fine-tune an N:M-sparse causal language model with TRL's SFTTrainer.

    accelerate launch recipes/train_causal_lm.py                  # causal_lm_tiny.yaml, offline
    accelerate launch recipes/train_causal_lm.py --train_file notes.txt --max_steps 200
    accelerate launch recipes/train_causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --one_shot wanda \\
        --n_keep 2 --m 4 --locations FF,QKV,O --max_steps 1000
    accelerate launch recipes/train_causal_lm.py --train_file notes.txt --use_peft true --lora_r 16
    python recipes/train_causal_lm.py --help

A config is a path or the name of a shipped one (nmsparse_hf/recipes/configs/). The final model,
its tokenizer, model card (with the held-out perplexity) and N:M metadata are written to
<output_dir>/final. See docs/RECIPES.md.
"""

from nmsparse_hf.recipes.causal_lm import cli

if __name__ == "__main__":
    cli()
