"""Learned scorer, calibration loop (loss, resume), recipes, export and push."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, make_base_model, perturb_learned_modules, remote_code_loader, whole_and_stepwise_logits
from safetensors.torch import load_file, save_file

import sparsemem
from sparsemem.modeling.learned_scorer import LearnedBlockScorer
from sparsemem.modeling.scorer import PooledKeyScorer, summarize_blocks
from sparsemem.training import StopTraining, parse_recipe, train
from sparsemem.training.objectives import register_distillation_attention
from sparsemem.training.recipe import Phase1
from sparsemem.training.trainer import _phase1_loss, _phase2_loss, scorers

OPTIONS = dict(block_size=8, sink_tokens=4, local_tokens=16, top_k_blocks=2, block_fraction=0.1)


@pytest.mark.parametrize("init", ["minmax", "hybrid"])
def test_untrained_learned_scorer_equals_its_training_free_start(family, init):
    base = make_base_model(family)
    # the union with the bound (the default) keeps an untrained scorer at the bound's ranking: hybrid goes without
    union = "minmax" if init == "minmax" else None
    learned = sparsemem.convert(base, scorer="learned", scorer_dim=8, scorer_init=init, scorer_union=union, **OPTIONS)
    training_free = sparsemem.convert(base, scorer=init, **OPTIONS)
    generator = torch.Generator().manual_seed(1)
    scorer = learned.model.layers[0].self_attn.scorer
    query = torch.randn(2, 2, 2, 5, scorer.head_dim, generator=generator)
    keys = torch.randn(2, 2, 40, scorer.head_dim, generator=generator)
    summaries = summarize_blocks(keys, torch.arange(40) // 8, 6)  # block 5 is empty
    assert isinstance(scorer, LearnedBlockScorer)
    got, want = scorer(query, summaries), PooledKeyScorer(init)(query, summaries)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isinf(got[..., 5]).all())
    if init == "hybrid":
        torch.testing.assert_close(got[..., :5], want[..., :5], rtol=0, atol=1e-6)
    else:  # both orders of the union are the bound's: the bound's ranking, whatever the values
        assert torch.equal(got[..., :5].argsort(-1), want[..., :5].argsort(-1))
    ids = torch.randint(3, 256, (1, 96), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(learned(ids).logits, training_free(ids).logits, rtol=0, atol=0)


def test_learned_scorer_option_validation():
    with pytest.raises(ValueError, match="scorer_dim"):
        sparsemem.convert(make_base_model("llama"), scorer="learned", scorer_dim=0)
    with pytest.raises(ValueError, match="scorer_init"):
        sparsemem.convert(make_base_model("llama"), scorer="learned", scorer_init="mean")


def test_learned_params_round_trip_and_base_checkpoint_init(family, tmp_path):
    base = make_base_model(family)
    base.save_pretrained(tmp_path / "base")
    model = sparsemem.convert(base, scorer="learned", scorer_dim=8, **OPTIONS)
    with torch.no_grad():
        for module in scorers(model):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "sparse")
    saved = load_file(tmp_path / "sparse" / "model.safetensors")
    assert "model.layers.0.self_attn.scorer.key_proj" in saved and "model.layers.0.self_attn.q_proj.weight" in saved
    _, model_class = sparsemem.FAMILIES[family]
    again = model_class.from_pretrained(tmp_path / "sparse")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # a base checkpoint: base weights load, scorer parameters get their initialisation (= hybrid here)
    fresh = model_class.from_pretrained(tmp_path / "base", scorer="learned", scorer_dim=8, scorer_init="hybrid", scorer_union=None, **OPTIONS)
    scorer = fresh.model.layers[1].self_attn.scorer
    assert torch.equal(scorer.key_proj, torch.zeros_like(scorer.key_proj)) and torch.equal(scorer.mix, torch.ones_like(scorer.mix))
    ids = torch.randint(3, 256, (1, 80))
    with torch.no_grad():
        reference = sparsemem.convert(base, scorer="hybrid", **OPTIONS)(ids).logits
        torch.testing.assert_close(fresh(ids).logits, reference, rtol=0, atol=1e-6)


def test_phase_losses_reach_the_scorer(family):
    """Both objectives are finite and give the scorer a gradient, for every family."""
    from accelerate import Accelerator

    from sparsemem.training.recipe import Phase2

    register_distillation_attention()
    model = sparsemem.convert(make_base_model(family), scorer="learned", scorer_dim=8, **OPTIONS)
    model.requires_grad_(False)
    for module in scorers(model):
        module.requires_grad_(True)
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    for compute in (
        lambda: _phase1_loss(model, model.config, ids, Phase1(queries_per_layer=16), torch.Generator().manual_seed(0), accelerator)[0],
        lambda: _phase2_loss(model, ids, Phase2(kl_tokens=32), False, accelerator)[0],
    ):
        loss = compute()
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        grads = [p.grad for m in scorers(model) for p in m.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_recomputes_with_the_selection_gate():
    """Phase 2 sets the gate on the config, so the layers gradient checkpointing recomputes during the
    backward pass take the gated path again: the scorer gets the same gradient as without checkpointing,
    none once the phase has ended, and the gate is off afterwards."""
    from accelerate import Accelerator

    from sparsemem.training.recipe import Phase2
    from sparsemem.training.trainer import end_phase2

    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    grads = {}
    for checkpointing in (False, True):
        model = sparsemem.convert(make_base_model("llama"), scorer="learned", scorer_dim=8, **OPTIONS)
        perturb_learned_modules(model)
        model.requires_grad_(False)
        for module in scorers(model):
            module.requires_grad_(True)
        loss, _ = _phase2_loss(model, ids, Phase2(kl_tokens=32, gate_temperature=0.5), checkpointing, accelerator)
        assert model.config.selection_gate_temperature == 0.5 and model.is_gradient_checkpointing == checkpointing
        loss.backward()  # with checkpointing, each layer runs again here
        grads[checkpointing] = [p.grad.clone() for m in scorers(model) for p in m.parameters() if p.grad is not None]
        end_phase2(model)
        assert model.config.selection_gate_temperature is None and not model.training
    assert grads[False] and sum(float(g.abs().sum()) for g in grads[False]) > 0
    assert len(grads[True]) == len(grads[False])
    for with_checkpoints, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_checkpoints, without, rtol=1e-5, atol=1e-7)
    # with the gate off, the end-to-end loss gives the scorer no gradient (top-k selection is a step function)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, use_cache=False, logits_to_keep=32).logits
    out.float().pow(2).mean().backward()
    assert all(p.grad is None or not p.grad.any() for m in scorers(model) for p in m.parameters())
    with pytest.raises(ValueError, match="selection_gate_temperature"):
        sparsemem.convert(make_base_model("llama"), selection_gate_temperature=0, **OPTIONS)


def test_mass_weighted_distillation_weighs_rows_by_their_cold_mass():
    """The weighted phase-1 loss is sum_r m_r KL_r / sum_r m_r over (KV head, query) rows r, with m_r the
    dense attention mass of the row's cold blocks (recomputed here from plain softmax attention); the
    unweighted loss is the plain mean of the same KL_r."""
    from sparsemem.modeling.anchors import anchor_mask
    from sparsemem.training.objectives import ScorerDistillation

    model = sparsemem.convert(make_base_model("llama"), scorer="learned", scorer_dim=8, **OPTIONS)
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 64, 16, generator=generator) * 2
    key = torch.randn(1, 2, 64, 16, generator=generator) * 2
    collected = {}
    for weighted in (True, False):
        collector = ScorerDistillation(model.config, 64, torch.Generator().manual_seed(0), mass_weighted=weighted)
        collector(attention, query, key, 0.25)
        collected[weighted] = (collector.loss().item(), collector.rows[0])
    (weighted_loss, (positions, kl, mass)), (plain_loss, (_, plain_kl, _)) = collected[True], collected[False]
    assert torch.equal(kl, plain_kl)
    assert weighted_loss == pytest.approx(float((kl * mass).sum() / mass.sum()), rel=1e-5)
    assert plain_loss == pytest.approx(float(kl.mean()), rel=1e-5)
    assert weighted_loss != pytest.approx(plain_loss, rel=1e-2)
    # the masses, from scratch: softmax over visible keys, cold keys summed per 8-token block, max over each group
    keys_at = torch.arange(64)
    visible = keys_at[None] <= positions[:, None]
    probs = torch.softmax((query[:, :, positions] @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~visible, float("-inf")), -1)
    cold = visible & ~anchor_mask(positions, keys_at, OPTIONS["sink_tokens"], OPTIONS["local_tokens"])
    blocks = (probs * cold).view(1, 4, -1, 8, 8).sum(-1)
    torch.testing.assert_close(mass, blocks.view(1, 2, 2, -1, 8).amax(2).sum(-1), rtol=1e-5, atol=1e-7)
    assert bool((mass > 0).all()) and float(mass.max() / mass.min()) > 2  # the rows really weigh differently


# -- calibration runs on a tiny model with the real tokenizer and real text ---------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = make_base_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(base, output, **overrides):
    values = {
        "base_model": str(base),
        "output_dir": str(output),
        "sparsemem": {**OPTIONS, "scorer_dim": 8},
        "data": {"train": [{"name": "python-docs", "max_chars": 60000}], "eval": {"name": "python-docs", "max_chars": 60000},
                 "eval_tokens": 512},
        "sequence_length": 128,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "phase1": {"steps": 4, "lr": 1e-2, "queries_per_layer": 32},
        "phase2": {"steps": 2, "lr": 1e-3, "kl_tokens": 64, "sequence_length": 96, "micro_batch_size": 1},
        "gradient_checkpointing": True,
        "checkpoint_every": 2,
    }
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return parse_recipe(values)


def _log(output):
    return [json.loads(line) for line in (Path(output) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "full"
    train(_recipe(tiny_base, output))
    return output


def test_resumed_run_continues_the_interrupted_one(tiny_base, uninterrupted, tmp_path):
    output = tmp_path / "resumed"
    recipe = _recipe(tiny_base, output)
    with pytest.raises(StopTraining):
        train(recipe, stop_after=3)  # killed after step 3; the last checkpoint is step 2
    assert [r["step"] for r in _log(output)] == [1, 2, 3]
    train(recipe)
    want, got = _log(uninterrupted), _log(output)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in want]
    assert [r["phase"] for r in got] == [1, 1, 1, 1, 2, 2]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a, b)
        assert a["tokens"] == b["tokens"]
    final_a = load_file(uninterrupted / "final" / "sparsemem_modules.safetensors")
    final_b = load_file(output / "final" / "sparsemem_modules.safetensors")
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-7)


def test_recipe_errors_name_the_problem(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="phase1.stepz"):
        _recipe(tiny_base, tmp_path, phase1={"stepz": 3})
    with pytest.raises(ValueError, match="learning_rate"):
        _recipe(tiny_base, tmp_path, learning_rate=3)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        _recipe(tiny_base, tmp_path, data={"train": [str(tmp_path / "missing.txt")]})
    with pytest.raises(ValueError, match="sparsemem.top_k"):
        _recipe(tiny_base, tmp_path, sparsemem={"top_k": 3})
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    recipe = _recipe(tmp_path / "gpt2", tmp_path / "out")
    with pytest.raises(ValueError, match="gpt2"):
        train(recipe)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,key", [
    ({"max_grad_norm": -1}, "max_grad_norm"),  # would turn training into gradient ascent
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"max_grad_norm": "1.0"}, "max_grad_norm"),
    ({"phase1": {"weight_decay": "0.1"}}, "phase1.weight_decay"),
    ({"phase2": {"weight_decay": -0.1}}, "phase2.weight_decay"),
    ({"data": {"max_train_tokens": "1e6"}}, "data.max_train_tokens"),
    ({"data": {"max_train_tokens": 0}}, "data.max_train_tokens"),
    ({"data": {"train": [{"name": "python-docs", "max_chars": "lots"}]}}, r"data.train\[0\].max_chars"),
    ({"phase2": {"lora": {"r": "eight"}}}, "phase2.lora.r"),
    ({"phase2": {"lora": {"alpha": 0}}}, "phase2.lora.alpha"),
    ({"phase2": {"lora": {"dropout": 1.5}}}, "phase2.lora.dropout"),
    ({"phase2": {"lora": {"lr": "fast"}}}, "phase2.lora.lr"),
    ({"phase2": {"lora": {"target_modules": "q_proj"}}}, "phase2.lora.target_modules"),
    ({"phase2": {"lora": {"target_modules": ["q_proj", 3]}}}, r"phase2.lora.target_modules\[1\]"),
    ({"eval": {"lengths": 4096}}, "eval.lengths"),
    ({"eval": {"lengths": ["4096"]}}, r"eval.lengths\[0\]"),
    ({"sparsemem": {"block_size": -5}}, "sparsemem.*block_size"),
    ({"sparsemem": {"top_k_blocks": 0}}, "sparsemem.*top_k_blocks"),
    ({"seed": "zero"}, "seed"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"report_to": "wandb"}, "report_to"),
])
def test_recipe_values_are_typed_before_the_model_loads(tiny_base, tmp_path, overrides, key):
    with pytest.raises(ValueError, match=f"recipe: `{key}"):
        _recipe(tiny_base, tmp_path, **overrides)


def test_real_recipes_parse():
    root = Path(__file__).parents[1] / "recipes"
    from sparsemem.training import load_recipe

    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == ["llama-3.1-8b.yaml", "mistral-7b-v0.3.yaml", "qwen2.5-7b.yaml", "qwen3-8b.yaml",
                     "smollm2-135m-cpu-smoke.yaml", "smollm2-135m-gpu-block-slots.yaml", "smollm2-135m-gpu.yaml"]
    for name in names:
        recipe = load_recipe(root / name)
        assert recipe.total_steps > 0 and recipe.sparsemem["scorer"] == "learned"


@pytest.mark.slow
def test_cpu_smoke_recipe_lowers_the_scorer_loss(smollm2_dir, tmp_path):
    """The shipped CPU smoke recipe on SmolLM2-135M: the phase-1 KL on a fixed held-out batch falls."""
    from accelerate import Accelerator

    from sparsemem.training import load_recipe
    from sparsemem.training.trainer import load_models

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "smollm2-135m-cpu-smoke.yaml")
    recipe.output_dir = str(tmp_path / "smoke")
    recipe.phase2.steps = 0  # phase 2 is covered on the tiny model; keep CI time down
    train(recipe)
    register_distillation_attention()
    _, _, model = load_models(recipe)
    ids = load_file(tmp_path / "smoke" / "heldout.safetensors")["input_ids"][: recipe.sequence_length][None]
    accelerator = Accelerator(cpu=True)

    def loss():
        with torch.no_grad():
            return _phase1_loss(model, model.config, ids, Phase1(queries_per_layer=256), torch.Generator().manual_seed(0), accelerator)[0].item()

    before = loss()
    model.load_sparsemem_modules(load_file(tmp_path / "smoke" / "final" / "sparsemem_modules.safetensors"))
    after = loss()
    print(f"held-out phase-1 KL: {before:.4f} -> {after:.4f}")
    assert after < before * 0.97, (before, after)

    # the held-out evaluation averages consecutive windows of each length
    from transformers import AutoModelForCausalLM

    from sparsemem.training.evaluation import evaluate_scorer, negative_log_likelihood

    report = evaluate_scorer(tmp_path / "smoke", lengths=(1024,), max_windows=2, device="cpu", output=tmp_path / "eval")
    dense = next(r for r in report["rows"] if r["model"] == "dense")
    heldout = load_file(tmp_path / "smoke" / "heldout.safetensors")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    expected = [negative_log_likelihood(base, heldout[i * 1024 : (i + 1) * 1024]) for i in range(2)]
    assert dense["windows"] == 2 and dense["window_nll"] == pytest.approx(expected, abs=1e-4)
    assert {r["model"] for r in report["rows"]} == {"dense", "training-free (minmax)", "training-free (hybrid)", "learned (final)"}
    for row in report["rows"]:
        assert row["nll"] == pytest.approx(sum(row["window_nll"]) / 2) and row["nll_gap"] == pytest.approx(row["nll"] - dense["nll"])
    assert (tmp_path / "eval" / "scorer.md").read_text().count("| 1024 | 2 |") == 4


# -- export, loading where sparsemem is not installed, push -------------------------------------------

LOADER = remote_code_loader('assert model.config.scorer == "learned"')


def _hub_cache(folder: Path, repo_id: str, root: Path) -> Path:
    """An offline Hub cache holding `folder` as the snapshot of `repo_id`, so a Hub id resolves without the network."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def _card_snippet(card: str, repo_id: str, folder: Path) -> str:
    """The card's Python snippet, reading `folder` where it names `repo_id`, with sparsemem not importable."""
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert repo_id in snippet
    return 'import sys\nsys.modules["sparsemem"] = None\n' + snippet.replace(repo_id, str(folder))


def test_export_loads_without_sparsemem(uninterrupted, tiny_base, tmp_path):
    from huggingface_hub import ModelCard

    from sparsemem.training.export import build_calibrated_model, export

    with pytest.raises(ValueError, match="--base-model"):  # the run's base is a local folder: no Hub id to name
        export(uninterrupted, tmp_path / "no-base", repo_id="acme/tiny-sparsemem")
    with pytest.raises(ValueError, match="OWNER/NAME"):
        export(uninterrupted, tmp_path / "no-base", repo_id="acme/tiny-sparsemem", base_model=str(tiny_base))
    full, modules = export(uninterrupted, tmp_path / "export", repo_id="acme/tiny-sparsemem", base_model="acme/tiny-llama")
    model, _, _ = build_calibrated_model(uninterrupted)
    trained = model.model.layers[0].self_attn.scorer.key_proj
    assert float(trained.detach().abs().sum()) > 0  # the exported scorer is the calibrated one, not the initialisation
    ids = torch.randint(3, 1000, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"input_ids": ids, "logits": model(ids).logits}, tmp_path / "reference.safetensors")
    assert (modules / "sparsemem_modules.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size / 10
    assert not (modules / "model.safetensors").exists() and not (modules / "lora").exists()
    for folder in (full, modules):
        config = json.loads((folder / "config.json").read_text())
        assert not {"quantization_config", "_model_name_or_path"} & set(config)
        assert config.get("_name_or_path", "acme/tiny-llama") == "acme/tiny-llama"
        assert str(tmp_path) not in (folder / "config.json").read_text() + (folder / "README.md").read_text()
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == "acme/tiny-llama" and card.data.library_name == "transformers"
    assert json.loads((modules / "config.json").read_text())["sparsemem_base_model"] == "acme/tiny-llama"
    # a fresh process where sparsemem is not importable, the base model reachable only by its Hub id
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules-cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(_hub_cache(tiny_base, "acme/tiny-llama", tmp_path / "hub"))}
    for folder in (full, modules):
        result = subprocess.run([sys.executable, "-c", LOADER, str(folder), str(tmp_path / "reference.safetensors")],
                                env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "OK" in result.stdout
        # the card's own snippet (model, tokenizer without a prompt, generate), run as written
        snippet = _card_snippet((folder / "README.md").read_text(), "acme/tiny-sparsemem", folder)
        result = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-3000:]


def test_export_includes_the_lora_adapter_phase2_trained(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparsemem.training.export import export

    output = tmp_path / "run"
    lora = {"r": 4, "alpha": 8, "lr": 1e-2, "target_modules": ["q_proj", "v_proj"]}
    train(_recipe(tiny_base, output, phase1={"steps": 1}, phase2={"steps": 2, "lora": lora}, checkpoint_every=100))
    full, modules = export(output, tmp_path / "export", base_model="acme/tiny-llama")
    adapter = json.loads((modules / "lora" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "acme/tiny-llama" and adapter["r"] == 4
    # the adapter on the base gives the exported (merged) attention projections
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, modules / "lora").merge_and_unload()
    exported = load_file(full / "model.safetensors")
    for name in ("q_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert not torch.equal(exported[key], load_file(tiny_base / "model.safetensors")[key])  # LoRA did train
        torch.testing.assert_close(merged.state_dict()[key], exported[key], rtol=0, atol=1e-6)


def test_push_fails_fast_offline(uninterrupted, tmp_path):
    from sparsemem.push import PushError, push

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(PushError, match="offline"):
        push(folder, "acme/tiny")
    # online mode but no route to the Hub: a clear error, quickly
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sparsemem.cli", "push", str(folder), "--repo-id", "acme/tiny"],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot push to 'acme/tiny'" in result.stderr
    assert time.perf_counter() - start < 60
    env.pop("HF_TOKEN")
    result = subprocess.run([sys.executable, "-m", "sparsemem.cli", "push", str(folder), "--repo-id", "acme/tiny"],
                            env={**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **env, "HF_HOME": str(tmp_path / "hf")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "no Hugging Face token" in result.stderr


# -- learned consolidation ----------------------------------------------------------------------------


def test_learned_consolidation_never_worse_than_attention_matching_on_held_out_queries():
    from sparsemem.modeling.attention_matching import SpanProblem
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress
    from sparsemem.modeling.consolidation import LearnedConsolidationPress, consolidation_loss

    generator = torch.Generator().manual_seed(0)
    problems, queries, span, dim = 4, 96, 120, 16
    # structured queries (a few directions plus noise), like a head's real queries
    directions = torch.randn(problems, 3, dim, generator=generator)
    mix = torch.randn(problems, queries, 3, generator=generator)
    q = mix @ directions + 0.3 * torch.randn(problems, queries, dim, generator=generator)
    k = torch.randn(problems, span, dim, generator=generator)
    v = torch.randn(problems, span, dim, generator=generator)
    scaling = dim**-0.5
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * scaling, -1) + 0.5
    problem = SpanProblem(q, k, v, torch.zeros(problems, span), lse, scaling)
    press = LearnedConsolidationPress(steps=20)
    head_span = HeadSpan(problem, torch.arange(span), torch.full((queries,), -1))
    index, keys, values, beta = press.compact(head_span, 12)
    # the start: the closed form with the same options (its newest 75% of the budget kept exact)
    am_index, am_keys, am_values, am_beta = AttentionMatchingPress().compact(head_span, 12)
    assert torch.equal(index, am_index)
    # the closed form keeps the 9 newest entries (75% of 12) exact; they stay as they are
    assert torch.equal(keys[:, 3:], am_keys[:, 3:]) and torch.equal(values[:, 3:], am_values[:, 3:])
    assert torch.equal(beta[:, 3:], am_beta[:, 3:])
    held_out = torch.arange(queries) % press.holdout_every == 0
    learned = consolidation_loss(problem, keys, values, beta, held_out)
    closed_form = consolidation_loss(problem, am_keys, am_values, am_beta, held_out)
    assert bool((learned <= closed_form + 1e-6).all())
    assert index.shape == (problems, 12) and torch.isfinite(values).all()
    # where a problem was refined, its held-out loss is strictly lower
    refined = ~torch.isclose(beta, am_beta).all(-1)
    assert bool(refined.any()) and bool((learned[refined] < closed_form[refined]).all())
    assert isinstance(press.for_ranking(), AttentionMatchingPress) and not isinstance(press.for_ranking(), LearnedConsolidationPress)
    # past `max_ratio` span entries per slot (here 24 > 20) a head keeps the closed form as it is
    few, closed = press.compact(head_span, 5), AttentionMatchingPress().compact(head_span, 5)
    assert all(torch.equal(a, b) for a, b in zip(few, closed)) and press.last_accepted == 0.0


def test_constant_memory_with_learned_consolidation():
    """Online compaction with the learned press: older slots are consolidated again, the budget holds."""
    from sparsemem.modeling.online_compaction import OnlineCompaction

    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    from sparsemem.modeling.presses import make_press
    from sparsemem.modeling.consolidation import LearnedConsolidationPress

    assert isinstance(make_press("am-learned"), LearnedConsolidationPress)
    online = OnlineCompaction(40, keep_first=4, method=LearnedConsolidationPress(steps=5))
    cache = sparsemem.SparseMemCache(model.config, online=online)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        for _ in range(30):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, past_key_values=cache).logits[:, -1]
            assert max(OnlineCompaction.physical_size(layer) for layer in cache.layers) <= 40
    assert cache.get_seq_length() == 60
    for layer in cache.layers:
        assert int(torch.bincount(layer.slots.head).max()) <= online.slots_per_head
        assert bool(torch.isfinite(layer.slots.beta).all()) and bool(torch.isfinite(layer.slots.values).all())


@pytest.mark.parametrize("scorer", ["hybrid", "learned"])
def test_standardised_scorers_select_alike_in_prefill_and_decode(scorer):
    """A query standardises its scores over the blocks it can choose, not over later ones: reading a
    sequence in one prefill gives the logits that reading it token by token gives."""
    model = perturb_learned_modules(sparsemem.convert(make_base_model("llama"), scorer=scorer, scorer_dim=8, **OPTIONS))
    ids = torch.randint(3, 256, (1, 112), generator=torch.Generator().manual_seed(5))
    whole, stepwise = whole_and_stepwise_logits(model, ids, 64)
    torch.testing.assert_close(stepwise, whole, rtol=1e-4, atol=1e-4)


def test_union_takes_the_best_blocks_of_both_orders():
    """With `union="minmax"` the k best blocks hold the first ceil(k/2) of the trained order and the first
    floor(k/2) of the bound's (more of either where they overlap); without it, the trained order alone."""
    generator = torch.Generator().manual_seed(2)
    scorer = LearnedBlockScorer(2, 16, dim=8, union="minmax")
    with torch.no_grad():
        scorer.key_proj.normal_(generator=generator)
        scorer.mix.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # trained order: mean term + learned term, no bound
    query = torch.randn(1, 2, 2, 6, 16, generator=generator)
    summaries = summarize_blocks(torch.randn(1, 2, 160, 16, generator=generator), torch.arange(160) // 8, 20)
    trained, bound = scorer.relevance(query, summaries), PooledKeyScorer.bound_scores(query.float(), summaries)
    fused = scorer(query, summaries)
    for k in (1, 2, 5, 8):
        chosen = fused.topk(k, dim=-1).indices
        for order, share in ((trained, (k + 1) // 2), (bound, k // 2)):
            best = order.topk(share, dim=-1).indices
            assert bool((best[..., :, None] == chosen[..., None, :]).any(-1).all())
    alone = LearnedBlockScorer(2, 16, dim=8, union=None)
    alone.load_state_dict(scorer.state_dict())
    assert torch.equal(alone(query, summaries), trained)
    assert not torch.equal(fused.topk(5, dim=-1).indices.sort(-1).values, trained.topk(5, dim=-1).indices.sort(-1).values)


def test_model_card_table_reports_windows_and_gaps(tmp_path):
    from sparsemem.training.export import _eval_table

    assert "sparsemem eval scorer --run" in _eval_table(tmp_path)
    rows = [{"model": "dense", "length": 4096, "windows": 8, "perplexity": 7.7917, "perplexity_gap": 0.0, "nll_gap": 0.0, "density": None},
            {"model": "learned (final)", "length": 4096, "windows": 8, "perplexity": 8.119, "perplexity_gap": 0.3273,
             "nll_gap": 0.0412, "density": 0.136}]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "scorer.json").write_text(json.dumps({"rows": rows, "meta": {"device": "NVIDIA H200", "dtype": "float32",
                                                                                       "eval_tokens": "32768 held-out tokens"}}))
    table = _eval_table(tmp_path).splitlines()
    assert table[2] == "| 4096 | 8 | dense | 7.7917 | - | 100% |"
    assert table[3] == "| 4096 | 8 | learned (final) | 8.1190 | +0.3273 (+0.0412 nats) | 13.6% |"
