"""Fine-tune an N:M-sparse text classifier (BERT-style or T5 text to text) with the Trainer.

    accelerate launch recipes/train_text_classification.py --train_file train.csv \
        --validation_file dev.csv                             # built-in tiny-bert, offline
    accelerate launch recipes/train_text_classification.py t5_base_glue_mdgf_exp_1of32.yaml
    accelerate launch recipes/train_text_classification.py t5_base_glue_mdgf_exp_1of32.yaml \\
        --dataset_config_name mnli --max_steps 1000           # flags override the config
    accelerate launch recipes/train_text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name rte --output_dir outputs/bert-rte \\
        --n_keep 1 --m 8 --locations FF,QKV --decay_type exp --decay_coef 0.002
    accelerate launch recipes/train_text_classification.py --model_name_or_path ./my-model \\
        --train_file train.csv --validation_file dev.csv --text_columns sentence --output_dir out
    python recipes/train_text_classification.py --help

A config is a path or the name of a shipped one (nmsparse_hf/recipes/configs/). The final model,
its tokenizer, model card and N:M metadata are written to <output_dir>/final. See
docs/RECIPES.md.
"""

from nmsparse_hf.recipes.text_classification import cli

if __name__ == "__main__":
    cli()
