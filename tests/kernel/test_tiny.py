"""The embedded model "tiny": its tasks, its training script, and the shipped checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.kernel.tiny import tasks

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SHIPPED = Path(tasks.__file__).parent / "model"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "eval.json")
TINY_FLAGS = ["--steps", "3", "--hidden", "64", "--intermediate", "128", "--layers", "1",
              "--heads", "4", "--kv-heads", "2", "--rows", "4", "--eval-n", "3"]


# -- tasks -------------------------------------------------------------------------------

def test_heldout_split_is_disjoint_from_training():
    for task in tasks.TASKS:
        train = {tasks.problem_key(task, p) for p, _ in tasks.examples(task, 3000, "train", 1)}
        test = {tasks.problem_key(task, p) for p, _ in tasks.examples(task, 300, "test", 1)}
        assert train and test and not train & test
        assert all(tasks.is_heldout(k) for k in test)
        assert not any(tasks.is_heldout(k) for k in train)


def test_earlier_chat_turns_come_from_the_same_split():
    for split in tasks.SPLITS:
        for messages, _ in tasks.examples("chat", 300, split, 2):
            for m in messages:
                if m["role"] == "user":
                    key = tasks.problem_key("chat", [m])
                    assert tasks.is_heldout(key) == (split == "test")


def test_examples_are_a_pure_function_of_their_arguments():
    assert tasks.examples("chat", 50, "train", 7) == tasks.examples("chat", 50, "train", 7)
    assert tasks.examples("add", 50, "train", 7) != tasks.examples("add", 50, "train", 8)


def test_test_split_draws_distinct_problems_and_refuses_too_many():
    problems = tasks.examples("add", 500, "test", 0)
    assert len({p for p, _ in problems}) == 500
    with pytest.raises(ValueError):
        tasks.examples("add", 5000, "test", 0)


def test_prompt_kinds_and_answers():
    (prompt, expected), = tasks.examples("add", 1, "train", 3)
    a, b = map(int, prompt.rstrip("=").split("+"))
    assert expected == str(a + b) and 10 <= a <= 99 and 10 <= b <= 99
    (prompt, expected), = tasks.examples("reverse", 1, "train", 3)
    letters = prompt.removeprefix("reverse ").removesuffix(" =").split()
    assert expected.split() == letters[::-1]
    (messages, _), = tasks.examples("chat", 1, "train", 3)
    assert isinstance(messages, list) and messages[-1]["role"] == "user"


def test_score_accepts_right_and_rejects_wrong_answers():
    assert tasks.score("add", "59", "59")
    assert tasks.score("add", "59</s>", "59")
    assert tasks.score("reverse", " t a c", "t a c")
    assert tasks.score("chat", "t a c\n", "t a c")
    assert not tasks.score("add", "58", "59")
    assert not tasks.score("add", "590", "59")
    assert not tasks.score("add", "", "59")
    assert not tasks.score("reverse", " c a t", "t a c")
    assert not tasks.score("reverse", " tac", "t a c")
    with pytest.raises(ValueError):
        tasks.score("multiply", "1", "1")


def test_demo_prompts_cover_every_task_and_are_held_out():
    demos = tasks.demo_prompts()
    assert {task for task, _, _ in demos} == set(tasks.TASKS)
    for task, prompt, expected in demos:
        assert tasks.is_heldout(tasks.problem_key(task, prompt))
        assert isinstance(prompt, str) == (task != "chat")


def test_chat_template_renders_turns_with_bos_and_generation_prompt():
    text = tasks.render_chat([{"role": "user", "content": "add 1 2"}])
    assert text == "<s><|user|>\nadd 1 2</s>\n<|assistant|>\n"


# -- the training script -----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of training of a one-layer model, through the command line."""
    out = tmp_path_factory.mktemp("tiny")
    proc = subprocess.run([sys.executable, "-m", "llmos.kernel.tiny.train", "--out", str(out),
                           *TINY_FLAGS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_training_prints_progress_and_an_eval_table(trained):
    out, stdout = trained
    assert "step     3/3" in stdout and "tok/s" in stdout and "eta" in stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report["results"]) == set(tasks.TASKS)
    assert all(r["total"] == 3 for r in report["results"].values())


def test_training_output_loads_in_transformers(trained):
    out, _ = trained
    for name in HF_FILES:
        assert (out / name).is_file(), name
    _check_loads(out)


def test_same_seed_gives_same_weights(trained, tmp_path):
    from llmos.kernel.tiny import train
    first, _ = trained
    train.main(["--out", str(tmp_path), *TINY_FLAGS])
    assert (tmp_path / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert _weights(tmp_path) == _weights(first)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return {n: t.numpy().tobytes() for n, t in load_file(path / "model.safetensors").items()}


def _check_loads(path: Path):
    """Load `path` with the Auto classes; return (model, tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("12+47=")["input_ids"][0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    tokens = tok.convert_ids_to_tokens(tok("12+47=")["input_ids"])
    assert tokens == ["<s>", "1", "2", "+", "4", "7", "="]   # digits split one by one
    messages = [{"role": "user", "content": "add 12 47"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tasks.render_chat(messages)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    return model, tok


# -- the shipped checkpoint --------------------------------------------------------------

def test_shipped_checkpoint_is_complete_small_and_uses_gqa():
    for name in HF_FILES:
        assert (SHIPPED / name).is_file(), name
    assert sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file()) <= 10_000_000
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]


def test_shipped_model_adds_held_out_numbers():
    from llmos.kernel.tiny.train import generate
    model, tok = _check_loads(SHIPPED)
    problems = tasks.examples("add", 16, "test", seed=123)
    completions = generate(model.eval(), tok, [p for p, _ in problems])
    correct = sum(tasks.score("add", c, e) for c, (_, e) in zip(completions, problems))
    assert correct >= 12, list(zip(completions, problems))


def test_shipped_model_answers_the_demo_prompts_mostly():
    from llmos.kernel.tiny.train import generate
    model, tok = _check_loads(SHIPPED)
    demos = tasks.demo_prompts()
    right = 0
    for task, prompt, expected in demos:
        right += tasks.score(task, generate(model.eval(), tok, [prompt])[0], expected)
    assert right >= len(demos) // 2
