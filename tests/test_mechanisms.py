"""Each Real-Fake mechanism checked against an independent computation (issue 2's list)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import mini_config

from realfake.conditioning import build_prompt, encode_prompts, inject_guidance
from realfake.losses import min_snr_weights, mmd_linear, mmd_rbf, realfake_loss


# -- loss ---------------------------------------------------------------------------------------------------
def test_mmd_linear_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 2, 2, 2, generator=g)
    target = torch.randn(3, 2, 2, 2, generator=g)
    w = torch.tensor([0.5, 1.0, 0.25])
    # hand formula from METHOD.md: ||sum_i w_i (eps_i - eps_theta_i)||^2 / D, element by element
    d = 8
    total = 0.0
    for j in range(d):
        s = 0.0
        for i in range(3):
            s += float(w[i]) * (float(target[i].flatten()[j]) - float(pred[i].flatten()[j]))
        total += s * s
    assert mmd_linear(pred, target, w).item() == pytest.approx(total / d, rel=1e-6)


def test_mmd_is_zero_when_batch_sums_match_but_mse_is_not():
    # two samples whose errors cancel: the diffusion loss is positive, the linear MMD is zero
    target = torch.zeros(2, 4)
    pred = torch.tensor([[1.0, -1.0, 2.0, 0.0], [-1.0, 1.0, -2.0, 0.0]])
    w = torch.ones(2)
    total, parts = realfake_loss(pred, target, w, mmd_weight=0.5)
    assert parts["mmd"] == pytest.approx(0.0, abs=1e-9)
    assert parts["diffusion"] == pytest.approx(float(((pred - target) ** 2).mean()))
    assert total.item() == pytest.approx(parts["diffusion"])


def test_realfake_loss_total_is_diffusion_plus_weighted_mmd():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    w = torch.tensor([1.0, 0.3, 0.7, 0.1])
    total, parts = realfake_loss(pred, target, w, mmd_weight=0.003)
    per = ((pred - target) ** 2).flatten(1).mean(1)
    assert parts["diffusion"] == pytest.approx(float((w * per).mean()), rel=1e-6)
    assert total.item() == pytest.approx(parts["diffusion"] + 0.003 * parts["mmd"], rel=1e-6)


def test_mmd_rbf_zero_for_identical_sets_and_positive_for_shifted():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    assert mmd_rbf(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd_rbf(x, x + 3.0).item() > 0.1


def test_min_snr_weights_match_definition():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(s.alphas_cumprod, t, 5.0), expected)
    assert torch.equal(min_snr_weights(s.alphas_cumprod, t, None), torch.ones(4))


# -- prompt and guidance slot ----------------------------------------------------------------------------
def test_prompt_template():
    assert build_prompt("photo of {class_name}, {caption}", "tench", "a man holding a fish") == (
        "photo of tench, a man holding a fish")
    assert build_prompt("photo of {class_name}, {caption}", "digit 3", None) == "photo of digit 3"
    assert build_prompt("photo of {class_name}, {caption}", "digit 3", "  ") == "photo of digit 3"
    assert build_prompt("a {class_name}", "cat", "ignored") == "a cat"


def test_inject_guidance_overwrites_only_the_last_slot():
    h = torch.randn(2, 77, 8)
    g = torch.randn(2, 8)
    out = inject_guidance(h, g)
    assert torch.equal(out[:, 76], g)
    assert torch.equal(out[:, :76], h[:, :76])
    assert not torch.equal(h[:, 76], g)  # input left untouched
    with pytest.raises(ValueError, match="projection width"):
        inject_guidance(h, torch.randn(2, 9))


class _UNetSpy:
    """Records the encoder hidden states of every UNet forward call."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.calls.append(ehs.detach().clone())

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base, digits_folder):
    from realfake.build import prepare, store_of

    cfg = mini_config(str(tmp_path_factory.mktemp("out")), tiny_base, digits_folder)
    prepare(cfg)
    return cfg, store_of(cfg)


def test_guidance_reaches_unet_slot_76_during_finetuning(prepared):
    from realfake.data.manifest import read_guidance
    from realfake.finetune import finetune
    from realfake.models.loading import load_sd_components

    cfg, store = prepared
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_steps": 1})})
    comps = load_sd_components(cfg.models.base)
    spy = _UNetSpy(comps["unet"])
    finetune(cfg, store, "all", components=comps)
    spy.remove()
    guidance = np.stack(list(read_guidance(store).values()))
    assert len(spy.calls) == 1
    ehs = spy.calls[0]
    assert ehs.shape[1] == 77
    # every row's slot 76 is one of the stored guidance vectors (float16 precision), and differs from the text
    for row in ehs[:, 76].numpy():
        assert np.min(np.abs(guidance - row).max(axis=1)) < 1e-6
    text = encode_prompts(comps["tokenizer"], comps["text_encoder"], ["photo of digit 0"], "cpu")
    assert not torch.allclose(ehs[0, 76], text[0, 76])


def test_guidance_in_slot_76_and_unet_call_count_at_generation(prepared):
    from realfake.data.manifest import read_guidance
    from realfake.synthesize import SynthesisEngine, plan_work

    cfg, store = prepared
    cfg = cfg.model_copy(update={
        "finetune": cfg.finetune.model_copy(update={"enabled": False}),
        "synthesis": cfg.synthesis.model_copy(update={"steps": 30, "strength": 0.75, "guidance_scale": 2.0}),
    })
    engine = SynthesisEngine(cfg, store)
    items = plan_work(cfg, store)[:3]
    spy = _UNetSpy(engine.pipe.unet)
    list(engine.generate(items))
    spy.remove()
    # strength 0.75 of 30 steps = 22 denoising steps, one batched UNet call each (CFG doubles the batch)
    assert len(spy.calls) == int(30 * 0.75) == 22
    ehs = spy.calls[0]
    assert ehs.shape == (2 * len(items), 77, 64)
    guidance = read_guidance(store)
    cond = ehs[len(items):]  # diffusers puts the unconditional half first
    for k, w in enumerate(items):
        assert torch.allclose(cond[k, 76], torch.from_numpy(guidance[w.sample_id]), atol=1e-6)
    # the negative (unconditional) half carries no guidance vector
    assert torch.allclose(ehs[0, 76], engine.negative[0, 76])


def test_lora_scale_changes_the_output(prepared):
    from realfake.build import finetune
    from realfake.synthesize import SynthesisEngine, plan_work

    cfg, store = prepared
    finetune(cfg, "all")
    outs = []
    for scale in (0.0, 1.0):
        c = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"lora_scale": scale})})
        engine = SynthesisEngine(c, store)
        rec = next(iter(engine.generate(plan_work(c, store)[:1])))
        outs.append(np.asarray(rec.image, dtype=np.int16))
    assert np.abs(outs[0] - outs[1]).max() > 0


_GENERATE_ALONE = """
import hashlib, json, sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from realfake.build import store_of
from realfake.config import BuildConfig
from realfake.synthesize import SynthesisEngine, image_seed, plan_work
cfg = BuildConfig.model_validate_json(open(sys.argv[1]).read())
store = store_of(cfg)
items = plan_work(cfg, store)[:4]
rec = next(iter(SynthesisEngine(cfg, store).generate(items[2:3])))
print(json.dumps({"seeds": [image_seed(cfg.version, w.sample_id, w.replica, cfg.synthesis.seed) for w in items],
                  "key": rec.key, "seed": rec.meta["seed"], "pixels": np.asarray(rec.image).tolist()}))
"""


@pytest.mark.slow  # two more processes load the pipeline
def test_seed_depends_on_identity_not_on_batch_or_workers(prepared, tmp_path):
    import json
    import subprocess
    import sys

    from test_shards import same_library_env

    from realfake.synthesize import SynthesisEngine, image_seed, plan_work

    assert image_seed("v1", "a/b.png", 0, 0) == image_seed("v1", "a/b.png", 0, 0)
    assert len({image_seed("v1", "a/b.png", r, 0) for r in range(3)}) == 3
    assert image_seed("v2", "a/b.png", 0, 0) != image_seed("v1", "a/b.png", 0, 0)
    cfg, store = prepared
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"enabled": False})})
    items = plan_work(cfg, store)[:4]
    # two other workers, each its own process with its own string-hash salt, make item 2 alone
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    workers = [subprocess.Popen([sys.executable, "-c", _GENERATE_ALONE, str(tmp_path / "cfg.json"),
                                 str(torch.get_num_threads())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**same_library_env(), "PYTHONHASHSEED": salt}, text=True) for salt in ("1", "2")]
    engine = SynthesisEngine(cfg, store)
    together = {r.key: r for r in engine.generate(items)}
    alone = {r.key: r for r in engine.generate(items[2:3])}  # batch of one, as another worker would run it
    k = items[2].key
    assert together[k].meta["seed"] == alone[k].meta["seed"]
    a = np.asarray(together[k].image, dtype=np.int16)
    b = np.asarray(alone[k].image, dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # the same noise; only float reduction order may differ across batch sizes
    here = [together[w.key].meta["seed"] for w in items]
    for w in workers:
        out, err = w.communicate()
        assert w.returncode == 0, err[-3000:]
        other = json.loads(out)
        assert other["seeds"] == here and other["key"] == k and other["seed"] == alone[k].meta["seed"]
        # the same batch size on the same thread count: the very same pixels in another process
        assert np.array_equal(np.asarray(other["pixels"], dtype=np.uint8), np.asarray(alone[k].image))


def _version_like(cfg, store, version: str, **finetune):
    """A copy of the prepared version's manifest and guidance under another version, with finetune overrides."""
    from realfake.build import store_of
    from realfake.config import FinetuneConfig

    ft = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **finetune})
    cfg = cfg.model_copy(update={"version": version, "finetune": ft})
    out = store_of(cfg)
    for rel in (("real", "manifest.parquet"), ("features", "guidance.parquet")):
        out.write_bytes(store.read_bytes(*rel), *rel)
    return cfg, out


def test_mmd_term_reaches_training_with_its_configured_weight(prepared):
    from safetensors.torch import load

    from realfake.finetune import WEIGHTS_NAME, finetune

    cfg, store = prepared
    adapters, logs = {}, {}
    # 8 images per step (the MMD term's smallest batch), two steps: Adam's second step follows the gradients' size
    for name, weight in (("off", 0.0), ("off-again", 0.0), ("on", 0.5)):
        c, s = _version_like(cfg, store, f"mmd-{name}", mmd_weight=weight, batch_size=8, max_steps=2,
                             checkpoint_every=1000)
        finetune(c, s, "all")
        adapters[name] = load(s.read_bytes("adapters", "all", WEIGHTS_NAME))
        logs[name] = s.read_json("adapters", "all", "train_log.json")
    assert logs["on"]["config"]["mmd_weight"] == 0.5
    for step in logs["on"]["history"]:
        assert step["mmd"] > 0
        assert step["loss"] == pytest.approx(step["diffusion"] + 0.5 * step["mmd"], rel=1e-5)
    assert all(step["mmd"] == 0 for step in logs["off"]["history"])
    # the same seed gives the same adapter; only the MMD term makes the difference
    assert all(torch.equal(adapters["off"][k], adapters["off-again"][k]) for k in adapters["off"])
    assert any(not torch.equal(adapters["off"][k], adapters["on"][k]) for k in adapters["off"])


def test_generation_starts_from_its_source_image(prepared):
    from realfake.synthesize import SynthesisEngine, WorkItem, plan_work

    cfg, store = prepared
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"enabled": False})})
    engine = SynthesisEngine(cfg, store)
    first, other = plan_work(cfg, store)[:2]
    # the same image identity (so the same seed, prompt and guidance vector) started from another real image
    swapped = WorkItem(first.sample_id, first.label, first.class_name, other.uri, first.replica)
    starts: list[torch.Tensor] = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda m, args: starts.append(args[0].detach().clone()))
    try:
        a, b, again = (next(iter(engine.generate([w]))) for w in (first, swapped, first))
    finally:
        hook.remove()
    assert a.meta["seed"] == b.meta["seed"] == again.meta["seed"]
    steps = len(starts) // 3
    start_a, start_b, start_again = starts[0], starts[steps], starts[2 * steps]
    # the first denoising step sees the noised source latent: another source, another start; the same, the same.
    # (The tiny random VAE's latents are small next to the noise at strength 0.75, hence the small share; a start
    # that ignored the source would give the very same tensor.)
    assert torch.equal(start_a, start_again)
    assert (start_a - start_b).norm() > 1e-3 * start_a.norm()
    assert np.array_equal(np.asarray(a.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_finetune_without_latent_cache_runs_and_checkpoints_resume(prepared):
    from realfake.build import store_of
    from realfake.finetune import finetune
    from realfake.models.loading import load_sd_components

    cfg, _ = prepared
    cfg = cfg.model_copy(update={"version": "nocache", "finetune": cfg.finetune.model_copy(
        update={"cache_latents": False, "random_flip": True, "max_steps": 2, "checkpoint_every": 1})})
    store = store_of(cfg)
    src = store_of(prepared[0])
    for rel in (("real", "manifest.parquet"), ("features", "guidance.parquet")):
        store.write_bytes(src.read_bytes(*rel), *rel)
    # a run preempted in step 2 leaves the checkpoint of step 1, which a re-run resumes instead of restarting
    comps = load_sd_components(cfg.models.base)
    calls: list[int] = []

    def preempted_in_step_2(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("preempted")

    comps["unet"].register_forward_pre_hook(preempted_in_step_2, with_kwargs=True)
    with pytest.raises(RuntimeError, match="preempted"):
        finetune(cfg, store, "all", components=comps)
    assert store.read_json("adapters", "all", "checkpoint", "state.json")["step"] == 1
    res = finetune(cfg, store, "all")
    assert res.resumed_from == 1 and res.steps == 2
    assert not store.exists("adapters", "all", "checkpoint")  # removed once the adapter is final
    log = store.read_json("adapters", "all", "train_log.json")
    assert [h["step"] for h in log["history"]] == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_pil_gives_diffusers_pil_output_byte_for_byte(dtype):
    from diffusers.image_processor import VaeImageProcessor

    from realfake.synthesize import to_pil

    gen = torch.Generator().manual_seed(0)
    decoded = torch.rand((3, 3, 17, 23), generator=gen) * 2.2 - 1.1  # a VAE decode, a little outside [-1, 1]
    decoded[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 2 * (0.5 / 255) - 1, 2 * (2.5 / 255) - 1])  # ties round to even
    proc = VaeImageProcessor()
    want = proc.postprocess(decoded.to(dtype), output_type="pil")
    got = to_pil(proc.postprocess(decoded.to(dtype), output_type="pt"))
    assert [im.mode for im in got] == ["RGB"] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))



def test_an_adapter_is_reused_only_under_its_recipe(prepared):
    from realfake.build import finetune

    cfg, store = prepared
    finetune(cfg, "all")  # trained here, or by an earlier test of this module under the same recipe
    assert finetune(cfg, "all")["skipped"]
    # the finetune section is unchanged, but the prompts the adapter learned from are not
    template = "a photo of a {class_name}, realistic"
    assert template != cfg.synthesis.prompt_template
    other = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"prompt_template": template})})
    again = finetune(other, "all")
    assert not again["skipped"]
    logged = store.read_json("adapters", "all", "train_log.json")["recipe"]
    assert logged["synthesis.prompt_template"] == template
    assert finetune(other, "all")["skipped"]
