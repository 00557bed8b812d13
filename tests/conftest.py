"""Shared fixtures: tiny random models and processors built in memory (no downloads)."""

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

import mlx.core as mx
import pytest

from mm1_mlx.models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from mm1_mlx.models.model import Model
from mm1_mlx.processor import ImageSettings, Processor
from mm1_mlx.shapes.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

WORDS = ("what color is the square circle star shape how many shapes are there where describe image "
         "it a an red blue green yellow one two three left right top bottom center yes no . ? , "
         "hello world").split()


def make_tokenizer(words=WORDS):
    """A word-level tokenizer with our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *SPECIAL_TOKENS, "\n", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="<|end|>", additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE)


def make_processor(image_size=32, num_image_tokens=4, **image):
    settings = ImageSettings(image_size=image_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             **image)
    return Processor(make_tokenizer(), settings, num_image_tokens)


def make_config(processor, connector="c-abstractor", experts=0, image_size=32, patch=8,
                layers=2, context=512) -> ModelConfig:
    return ModelConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, image_size=image_size, patch_size=patch),
        connector_config=ConnectorConfig(type=connector, num_image_tokens=processor.num_image_tokens,
                                         hidden_size=32, depth=1),
        text_config=TextConfig(vocab_size=len(processor.tokenizer), hidden_size=64,
                               intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=experts, moe_every=2,
                               moe_intermediate_size=48, max_position_embeddings=context),
        image_token_id=processor.image_token_id,
    )


def make_model(config: ModelConfig, seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(config)
    mx.eval(model.parameters())
    model.eval()
    return model


@pytest.fixture(scope="session")
def processor():
    return make_processor()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, processor):
    """A saved random dense checkpoint (c-abstractor, 4 image tokens)."""
    from mm1_mlx.checkpoint import save

    model = make_model(make_config(processor))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save(model, processor, path)
    return path
