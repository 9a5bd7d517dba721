"""Training loops on tiny random models with the real tokenizers: PromptKD steps, SFT, checkpoints."""

import json

import pytest
import torch

from promptkd import data as dolly
from promptkd.config import ConfigError, DistillConfig, SFTConfig, load_config
from promptkd.distill import Distiller, distill, response_mask_from, sample_rollout
from promptkd.models import TINY_GPT2, TINY_LLAMA, tiny_model
from promptkd.runs import RunError, read_json, read_jsonl
from promptkd.sft import response_loss_sum, sft
from promptkd.soft_prompt import SoftPrompt, teacher_forward
from promptkd.training import BatchPlan, make_accelerator


def tiny_distill_config(tmp_path, **overrides) -> DistillConfig:
    values = dict(
        output_dir=str(tmp_path / "runs"),
        teacher=TINY_LLAMA,
        student=f"{TINY_LLAMA}:layers=0",
        train_limit=8,
        per_device_batch_size=2,
        max_steps=4,
        max_new_tokens=6,
        max_length=128,
        learning_rate=1e-3,
        prompt_learning_rate=1e-2,
        probe_every=0,
        save_every=0,
        mixed_precision="no",
    )
    values.update(overrides)
    return DistillConfig(**values)


def prompt_batch(tokenizer, count=2, max_prompt_tokens=60):
    records = dolly.load_split("dolly", "train", limit=count)
    prompts = [{"input_ids": dolly.encode_prompt(r, tokenizer, "dolly", max_prompt_tokens)} for r in records]
    return dolly.collate_left(prompts, tokenizer.pad_token_id)


def metric_rows(run_path):
    return [row for row in read_jsonl(run_path / "metrics.jsonl") if "loss" in row]


# -- response masks and positions ------------------------------------------------------------------


def test_response_mask_keeps_first_eos_only():
    eos = 50256
    tokens = torch.tensor([[5, 7, eos, eos, eos], [eos, eos, eos, eos, eos], [1, 2, 3, 4, 5]])
    mask = response_mask_from(tokens, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_with_pad_equal_eos_keeps_eos_in_loss(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    batch = prompt_batch(tokenizer)
    config = DistillConfig(max_new_tokens=4)
    # A tiny random model rarely samples EOS, so a large head bias makes EOS certain at every step.
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 1e4
    model.lm_head.bias = torch.nn.Parameter(bias)
    rollout = sample_rollout(model, tokenizer, batch, config)
    new_tokens = rollout.input_ids[:, batch["input_ids"].shape[1]:]
    assert (new_tokens[:, 0] == tokenizer.eos_token_id).all()
    assert rollout.response_mask[:, 0].tolist() == [1, 1]  # the EOS counts
    assert rollout.response_mask[:, 1:].sum().item() == 0  # padding after it does not


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_soft_prompt_batched_equals_unbatched(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    prompt = SoftPrompt(3, model.get_input_embeddings().weight.shape[1])
    prompt.weight.data.normal_()
    records = dolly.load_split("dolly", "train", limit=3)
    rows = [dolly.encode_prompt(r, tokenizer, "dolly", 80) for r in records]
    assert len({len(row) for row in rows}) > 1, "prompts of different lengths exercise the padding"
    batch = dolly.collate_left([{"input_ids": row} for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        batched = teacher_forward(model, batch["input_ids"], batch["attention_mask"], prompt, logits_to_keep=4)
        for i, row in enumerate(rows):
            ids = torch.tensor([row])
            alone = teacher_forward(model, ids, torch.ones_like(ids), prompt, logits_to_keep=4)
            torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


# -- PromptKD step ---------------------------------------------------------------------------------


def test_soft_prompt_is_the_only_teacher_parameter_that_changes(tiny_llama, smollm2_tok):
    teacher, tokenizer = tiny_llama
    student = tiny_model(TINY_LLAMA, len(smollm2_tok), seed=1)
    teacher.requires_grad_(False)
    student.train()
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    config = DistillConfig(max_new_tokens=4, learning_rate=1e-2, prompt_learning_rate=1e-1, warmup_ratio=0.0, mixed_precision="no")
    soft_prompt = SoftPrompt.from_text(teacher, tokenizer, config.soft_prompt_init, config.soft_prompt_length)
    prompt_before = soft_prompt.weight.detach().clone()
    student_before = student.get_input_embeddings().weight.detach().clone()

    distiller = Distiller(config, make_accelerator(config), teacher, student, tokenizer, soft_prompt, total_steps=4)
    for step in range(2):
        metrics, finite = distiller.step([prompt_batch(tokenizer)], step)
        assert finite

    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), f"teacher parameter {name} changed"
    assert all(p.grad is None for p in teacher.parameters())
    assert not torch.equal(soft_prompt.weight.detach(), prompt_before)
    assert not torch.equal(student.get_input_embeddings().weight.detach(), student_before)
    for key in ("loss", "prompt_loss", "prompt_kl_teacher", "reg_weight", "alpha", "teacher_entropy", "mean_weight",
                "kept_size", "fallbacks", "lr", "grad_norm", "tokens_per_s"):
        assert key in metrics, key


def test_prompt_tuning_off_leaves_no_prompt_optimizer(tiny_llama):
    teacher, tokenizer = tiny_llama
    config = DistillConfig(prompt_tuning=False, max_new_tokens=3, mixed_precision="no")
    soft_prompt = SoftPrompt.from_text(teacher, tokenizer, config.soft_prompt_init, 2)
    before = soft_prompt.weight.detach().clone()
    distiller = Distiller(config, make_accelerator(config), teacher, tiny_model(TINY_LLAMA, len(tokenizer), seed=2), tokenizer, soft_prompt, 2)
    metrics, finite = distiller.step([prompt_batch(tokenizer)], 0)
    assert finite
    assert "prompt" not in distiller.optimizers
    assert "prompt_loss" not in metrics
    assert torch.equal(soft_prompt.weight.detach(), before)


# -- whole runs ------------------------------------------------------------------------------------


def test_distill_run_writes_folder(tmp_path):
    config = tiny_distill_config(tmp_path, run_name="full", strategy="ta_filter+dynamic_blend+entropy_weighted", probe_every=2)
    run = distill(config)
    status = read_json(run.path / "status.json")
    assert status["state"] == "completed"
    assert status["step"] == 4
    assert len(metric_rows(run.path)) == 4
    assert (run.path / "model" / "config.json").is_file()
    assert (run.path / "soft_prompt.safetensors").is_file()
    assert not (run.path / "checkpoint").exists()  # removed once the run completed
    probes = read_jsonl(run.path / "probes.jsonl")
    assert [p["step"] for p in probes] == [0, 2, 4]
    example = probes[0]["examples"][0]
    assert len(example["entropy"]) == len(example["tokens"]) == len(example["kept_size"])

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(run.path / "model")
    assert reloaded.config.num_hidden_layers == 1


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = distill(tiny_distill_config(tmp_path, run_name="straight"))
    paused = distill(tiny_distill_config(tmp_path, run_name="paused", stop_after_steps=2))
    assert read_json(paused.path / "status.json")["state"] == "stopped"
    assert (paused.path / "checkpoint" / "trainer_state.pt").is_file()
    assert len(metric_rows(paused.path)) == 2

    resumed = distill(tiny_distill_config(tmp_path, run_name="paused", resume=True))
    assert read_json(resumed.path / "status.json")["state"] == "completed"
    expected, actual = metric_rows(straight.path), metric_rows(resumed.path)
    assert [row["step"] for row in actual] == [1, 2, 3, 4]
    for want, got in zip(expected, actual):
        for key in ("loss", "kl", "prompt_loss", "lr", "reg_weight"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"{key} at step {got['step']}"


def test_existing_run_folder_needs_resume(tmp_path):
    distill(tiny_distill_config(tmp_path, run_name="once", max_steps=1))
    with pytest.raises(RunError, match="already exists. Pass --resume"):
        distill(tiny_distill_config(tmp_path, run_name="once", max_steps=1))
    with pytest.raises(RunError, match="already completed"):
        distill(tiny_distill_config(tmp_path, run_name="once", max_steps=1, resume=True))
    with pytest.raises(RunError, match="no run folder"):
        distill(tiny_distill_config(tmp_path, run_name="never", resume=True))


def test_vocab_mismatch_fails_before_training(tmp_path):
    config = tiny_distill_config(tmp_path, run_name="mismatch", teacher=TINY_GPT2)
    with pytest.raises(ValueError, match="50257") as info:
        distill(config)
    assert "49152" in str(info.value)
    status = read_json(tmp_path / "runs" / "mismatch" / "status.json")
    assert status["state"] == "failed"
    assert "vocab" in status["error"].lower()


def test_missing_student_path_is_reported(tmp_path):
    config = tiny_distill_config(tmp_path, run_name="missing", student=str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        distill(config)


# -- SFT -------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    records = dolly.load_split("dolly", "train", limit=4)
    examples = [dolly.encode_example(r, tokenizer, "dolly", 96) for r in records]

    def gradients(groups):
        model.zero_grad()
        batches = [dolly.collate_left([examples[i] for i in group], tokenizer.pad_token_id) for group in groups]
        total = sum(int((b["labels"] != -100).sum()) for b in batches)
        for batch in batches:
            loss, _ = response_loss_sum(model, batch)
            (loss / total).backward()
        return [p.grad.clone() for p in model.parameters()]

    one_batch = gradients([[0, 1, 2, 3]])
    accumulated = gradients([[0, 1], [2, 3]])
    for full, parts in zip(one_batch, accumulated):
        torch.testing.assert_close(parts, full, atol=1e-6, rtol=1e-4)


def test_sft_loss_counts_final_eos_with_pad_equal_eos(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    record = dolly.load_split("dolly", "train", limit=1)[0]
    example = dolly.encode_example(record, tokenizer, "dolly", 96)
    batch = dolly.collate_left([example], tokenizer.pad_token_id)
    _, tokens = response_loss_sum(model, batch)
    assert tokens == sum(1 for label in example["labels"] if label != -100)
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_sft_run_and_nonfinite_failure(tmp_path, smollm2_tok):
    config = SFTConfig(output_dir=str(tmp_path / "runs"), run_name="sft", model=TINY_LLAMA, train_limit=8, max_steps=2,
                       max_length=96, eval_limit=4, mixed_precision="no", save_every=0)
    run = sft(config)
    assert read_json(run.path / "status.json")["state"] == "completed"
    rows = read_jsonl(run.path / "metrics.jsonl")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert sum("val_ppl" in row for row in rows) == 2

    broken = tiny_model(TINY_LLAMA, len(smollm2_tok))
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "broken")
    smollm2_tok.save_pretrained(tmp_path / "broken")
    config = SFTConfig(output_dir=str(tmp_path / "runs"), run_name="nan", model=str(tmp_path / "broken"), train_limit=8,
                       max_steps=5, max_length=96, max_nonfinite_steps=2, mixed_precision="no")
    with pytest.raises(FloatingPointError, match="2 non-finite losses in a row"):
        sft(config)
    status = read_json(tmp_path / "runs" / "nan" / "status.json")
    assert status["state"] == "failed"
    assert "non-finite" in status["error"]


# -- config and batching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", 1.5, r"alpha=1.5 is invalid: use a value in \[0, 1\]"),
        ("top_k", -1, "top_k=-1 is invalid"),
        ("top_p", 0.0, r"top_p=0.0 is invalid: use a value in \(0, 1\]"),
        ("top_p", 1.5, "top_p=1.5 is invalid"),
        ("soft_prompt_length", 0, "soft_prompt_length=0 is invalid"),
        ("max_new_tokens", 0, "max_new_tokens=0 is invalid"),
        ("strategy", "soft_blend+dynamic_blend", "two blend rules"),
        ("kl_direction", "sideways", "kl_direction='sideways' is invalid"),
    ],
)
def test_bad_distill_settings_raise(field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, overrides={field: value})


def test_config_file_and_unknown_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("strategy: ta_filter\ntop_k: 50\n")
    config = load_config(DistillConfig, path, {"top_k": 20})
    assert config.strategy == "ta_filter"
    assert config.top_k == 20
    (tmp_path / "bad.json").write_text(json.dumps({"alpah": 0.5}))
    with pytest.raises(ConfigError, match="Unknown DistillConfig field"):
        load_config(DistillConfig, tmp_path / "bad.json")


def test_batch_plan_shards_cover_epoch_once():
    plans = [BatchPlan(10, 2, num_processes=2, process_index=rank, seed=3, lengths=list(range(10))) for rank in range(2)]
    assert plans[0].micro_batches_per_epoch == 3
    seen = [i for counter in range(3) for plan in plans for i in plan.micro_batch(counter)]
    assert sorted(set(seen)) == list(range(10))
    assert len(seen) == 12  # two items repeat to fill the last global micro-batch
    assert plans[0].micro_batch(0) != plans[1].micro_batch(0)
