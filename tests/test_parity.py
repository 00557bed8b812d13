"""Parity with transformers on tiny random models (float32).

Module level (issue 2): CLIP / SigLIP vision hidden states, Llama / Mixtral logits.
Through the converter CLI (issue 3): LLaVA with CLIP and SigLIP towers, and Llama, Qwen2 and
Mixtral decoders assembled with a vision tower: logits within 1e-3 and 20 greedy tokens identical.
"""

import mm1_mlx  # noqa: F401, I001  (binds the BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from PIL import Image  # noqa: E402

from convert.__main__ import main as convert_main  # noqa: E402
from mm1_mlx.formats.configs import hf_vision_config, text_config  # noqa: E402
from mm1_mlx.formats.weights import convert_weights  # noqa: E402
from mm1_mlx.models.config import ModelConfig  # noqa: E402
from mm1_mlx.models.decoder import LanguageModel  # noqa: E402
from mm1_mlx.models.vision import VisionModel  # noqa: E402

WORDS = ("USER ASSISTANT what is in the image a cat dog on mat red blue describe this picture "
         "please one two three four five six seven eight nine ten : ? . ,").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def make_tokenizer(size=None):
    """Word-level tokenizer; with ``size`` it has that many tokens and no ``<image>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + WORDS
    if size:
        words = [w for w in words if w != "<image>"]
        words += [f"w{i}" for i in range(size - len(words))]
    vocab = {t: i for i, t in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if not size:
        fast.add_tokens(["<image>"], special_tokens=True)
    fast.chat_template = TEMPLATE
    return fast


IMAGE_ID = SPECIALS.index("<image>")


def seeded(fn):
    torch.manual_seed(0)
    return fn().float().eval()


def image(size=(40, 30)):
    """A smooth picture (resampling filters agree on it, unlike on noise)."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def save_llava(path, tower="clip", text="llama", strategy="default"):
    """A tiny LLaVA with its processor; returns (hf model, hf processor)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    vcfg = CLIPVisionConfig(**VISION) if tower == "clip" else SiglipVisionConfig(**VISION)
    tcfg = (LlamaConfig if text == "llama" else Qwen2Config)(**TEXT)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=IMAGE_ID,
                      vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    model = seeded(lambda: LlavaForConditionalGeneration(cfg))
    if tower == "clip":
        ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=make_tokenizer(), patch_size=8,
                          vision_feature_select_strategy=strategy, chat_template=TEMPLATE,
                          num_additional_image_tokens=1 if tower == "clip" else 0)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def save_vision(path, tower="clip"):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    if tower == "clip":
        m = seeded(lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)))
    else:
        m = seeded(lambda: SiglipVisionModel(SiglipVisionConfig(**VISION)))
    m.save_pretrained(path)
    return m


def decoder(kind):
    import transformers as t

    moe = dict(num_experts=4, num_experts_per_tok=2)
    others = {
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**TEXT)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**TEXT, head_dim=16)),
        "qwen2_moe": lambda: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            **TEXT, **moe, moe_intermediate_size=32, shared_expert_intermediate_size=48)),
        "qwen3_moe": lambda: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **TEXT, **moe, moe_intermediate_size=32, norm_topk_prob=True)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(**TEXT, **moe)),
    }
    if kind in others:
        return seeded(others[kind])
    LlamaConfig, LlamaForCausalLM = t.LlamaConfig, t.LlamaForCausalLM
    MixtralConfig, MixtralForCausalLM = t.MixtralConfig, t.MixtralForCausalLM
    Qwen2Config, Qwen2ForCausalLM = t.Qwen2Config, t.Qwen2ForCausalLM
    if kind == "llama":
        return seeded(lambda: LlamaForCausalLM(LlamaConfig(**TEXT, rope_theta=5000.0)))
    if kind == "qwen2":
        return seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**TEXT, tie_word_embeddings=True)))
    return seeded(lambda: MixtralForCausalLM(MixtralConfig(**TEXT, num_local_experts=4,
                                                           num_experts_per_tok=2)))


def hf_greedy(model, ids, n=20, **kw):
    ids = ids.clone()
    with torch.no_grad():
        first = model(input_ids=ids, **kw).logits
        for _ in range(n):
            nxt = model(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return first.numpy(), ids[0, -n:].tolist()


def mlx_greedy(model, ids, n=20, pixel_values=None):
    cache = make_prompt_cache(model.language_model)
    logits = model(mx.array(ids), pixel_values=pixel_values, cache=cache)
    first, out = np.array(logits), []
    tok = logits[:, -1].argmax(-1)
    for _ in range(n):
        out.append(tok.item())
        tok = model(tok[:, None], cache=cache)[:, -1].argmax(-1)
    return first, out


def convert_cli(argv):
    convert_main([*argv, "--dtype", "float32"])
    return mm1_mlx.load(argv[argv.index("--mlx-path") + 1])


# ---- issue 2: module-level parity with a minimal mapping ------------------------------------

def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def vision_module(hf, layer, post_layernorm=False):
    vc = hf_vision_config(hf.config.to_dict())
    vc.feature_layer, vc.post_layernorm, vc.keep_class_token = layer, post_layernorm, True
    config = ModelConfig(vision_config=vc, text_config=text_config(
        dict(TEXT, model_type="llama")))
    raw = {f"vision_tower.{k}": mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    w = convert_weights(raw, config, allow_missing=("connector.", "language_model."))
    model = VisionModel(vc)
    model.load_weights([(k[len("vision_tower."):], v) for k, v in w.items()], strict=True)
    return model


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vision_hidden_state_parity(tmp_path, tower):
    hf = save_vision(tmp_path, tower)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
    ours = vision_module(hf, -2)(mx.array(px.permute(0, 2, 3, 1).numpy()))
    assert rel_err(ours, out.hidden_states[-2]) <= 1e-4
    if tower == "siglip":  # SigLIP's last_hidden_state has the post-layernorm applied
        ours = vision_module(hf, -1, post_layernorm=True)(mx.array(px.permute(0, 2, 3, 1).numpy()))
        assert rel_err(ours, out.last_hidden_state) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "mixtral", "mistral", "qwen3", "qwen2_moe",
                                  "qwen3_moe", "olmoe"])
def test_decoder_logit_parity(kind):
    hf = decoder(kind)
    tc = text_config(hf.config.to_dict())
    vc = hf_vision_config(dict(VISION, model_type="clip_vision_model"))
    config = ModelConfig(vision_config=vc, text_config=tc)
    raw = {f"language_model.{k}": mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    w = convert_weights(raw, config, allow_missing=("connector.", "vision_tower."))
    model = LanguageModel(tc)
    model.load_weights([(k[len("language_model."):], v) for k, v in w.items()], strict=True)
    ids = torch.randint(5, VOCAB, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
    ours = model(model.embed(mx.array(ids.numpy())))
    assert rel_err(ours, ref) <= 1e-4


# ---- issue 3: converted through the CLI, loaded with mm1_mlx.load ---------------------------

@pytest.mark.parametrize("tower,text,strategy", [("clip", "llama", "default"),
                                                 ("siglip", "qwen2", "full")])
def test_llava_cli_parity(tmp_path, tower, text, strategy):
    hf, proc = save_llava(tmp_path / "hf", tower, text, strategy)
    model, processor = convert_cli(["--hf-path", str(tmp_path / "hf"),
                                    "--mlx-path", str(tmp_path / "mlx")])
    enc = proc(images=image(), text="USER: <image>\ndescribe this picture ASSISTANT:",
               return_tensors="pt")
    ids, px = enc["input_ids"], enc["pixel_values"]
    assert int((ids == IMAGE_ID).sum()) == model.config.num_image_tokens
    ref, ref_tokens = hf_greedy(hf, ids, pixel_values=px)
    ours, tokens = mlx_greedy(model, ids.numpy(), pixel_values=mx.array(px.permute(0, 2, 3, 1)
                                                                        .numpy()))
    assert np.abs(ours - ref).max() <= 1e-3
    assert tokens == ref_tokens
    # our processor expands <image> the same way and prepares the same pixels
    our_ids, our_px, _ = processor([{"role": "user", "content": "<image>\ndescribe this picture"}],
                                   [image()])
    assert our_ids.count(IMAGE_ID) == ids.eq(IMAGE_ID).sum().item()
    if tower == "siglip":  # squash resize: same recipe as the HF processor
        assert np.abs(our_px - px.permute(0, 2, 3, 1).numpy()).max() < 0.05


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_decoder_cli_parity(tmp_path, kind):
    hf = decoder(kind)
    # Mixtral goes through a sharded index
    shard = {"max_shard_size": "40KB"} if kind == "mixtral" else {}
    hf.save_pretrained(tmp_path / "text", **shard)
    make_tokenizer(VOCAB).save_pretrained(tmp_path / "text")  # full: <image> is added as 128
    save_vision(tmp_path / "vision")
    model, _ = convert_cli(["--vision", str(tmp_path / "vision"), "--text", str(tmp_path / "text"),
                            "--connector", "avg-pool", "--image-tokens", "4",
                            "--mlx-path", str(tmp_path / "mlx")])
    assert model.config.text_config.tie_word_embeddings == (kind == "qwen2")
    assert model.config.image_token_id == VOCAB
    ids = torch.randint(5, 40, (1, 10))
    ref, ref_tokens = hf_greedy(hf, ids)
    ours, tokens = mlx_greedy(model, ids.numpy())
    assert np.abs(ours[..., :VOCAB] - ref).max() <= 1e-3
    assert tokens == ref_tokens
