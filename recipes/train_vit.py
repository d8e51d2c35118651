"""Train an N:M-sparse ViT image classifier with the Hugging Face Trainer.

    accelerate launch recipes/train_vit.py                       # embedded default (digits, CPU ok)
    accelerate launch recipes/train_vit.py recipes/configs/vit_b16_imagenet_mdgf_1of32.yaml
    accelerate launch recipes/train_vit.py CONFIG.yaml --max_steps 100   # flags override the file
    accelerate launch recipes/train_vit.py --model_name_or_path google/vit-base-patch16-224 \\
        --dataset_name ILSVRC/imagenet-1k --streaming --max_steps 10000 --n_keep 2 --m 4 ...

A config file may use our keys or the seed research code's timm YAML keys. See README.md.
"""

from nmsparse_hf.recipe import run

if __name__ == "__main__":
    run(family="vit")
