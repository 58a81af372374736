"""A tiny CLIP folder for the opt-in CLIP score (weights random, tokenizer written here)."""

import pytest
import torch


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    """A tiny CLIP folder with random weights, as `from_pretrained` reads a real one (tokenizer written here)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnreuse.pipelines.tiny import DEFAULT_WORDS
    from attnreuse.pipelines.tokenizers import write_clip_tokenizer

    path = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(path, DEFAULT_WORDS)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path
