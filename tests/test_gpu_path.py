"""The GPU path, pinned on the CPU: the choices made for a CUDA device (kernels, precision, devices, RNG state) and
the number of reads back to the host per training and decoding step, which a GPU has to wait for."""

import contextlib
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

import agents
import checkpoint
import common
import eval as evaluation
import generate
import train_dpo
import train_sft
from model import VLM, get_config
from test_dpo import make_batch
from test_train_sft import loop_config, micro_model, synthetic_examples


# ----------------------------------------------------------------------------------------------
# Kernels, precision, devices and RNG state


def sdpa_flags():
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


def test_dpo_passes_share_one_kernel_choice_on_cuda():
    # On CUDA only flash attention, else the math kernel: neither changes with requires_grad.
    with train_dpo.same_kernels(torch.device("cuda")):
        assert sdpa_flags() == (True, False, True, False)
    before = sdpa_flags()
    with train_dpo.same_kernels(torch.device("cpu")):  # model.attention already pins them by the module's mode
        assert sdpa_flags() == before


def host_side_pairs(monkeypatch, policy, n):
    """n (chosen, rejected) pairs of encoded examples, as dpo_round's encode_pairs would give."""
    monkeypatch.setattr(train_dpo, "encode_pairs", lambda pairs, *a: pairs)
    monkeypatch.setattr(train_dpo.data, "special_ids", lambda tok: {"pad": 0})
    return [[c, r] for c, r in zip(synthetic_examples(policy, n, seed=1), synthetic_examples(policy, n, seed=2))]


def test_dpo_round_runs_reference_and_policy_under_the_same_kernels(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(torch.is_grad_enabled())
        yield

    monkeypatch.setattr(train_dpo, "same_kernels", recording)
    policy = micro_model()
    pairs = host_side_pairs(monkeypatch, policy, 2)
    cfg = train_dpo.DPOConfig(batch_size=2, precision="fp32", lr=1e-4, epochs=1)
    train_dpo.dpo_round(policy, pairs, cfg, torch.device("cpu"), lambda record: None, 1, ".")
    assert entered == [False, True]  # the reference pass (no grad), then the one training step


def test_auto_precision_follows_the_chosen_gpu(monkeypatch):
    # bf16 needs compute capability 8.0 (Ampere); is_bf16_supported() would also count emulation.
    capability = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    assert common.resolve_precision("cuda:0", "auto") == "bf16"
    assert common.resolve_precision("cuda:1", "auto") == "fp16"
    assert agents.decode_dtype("cuda:1") == torch.float16 and agents.decode_dtype("cuda:0") == torch.bfloat16
    assert agents.decode_dtype("cpu") is None  # auto decodes in fp32 on the CPU
    assert agents.decode_dtype("cpu", "bf16") == torch.bfloat16  # an explicit --precision is followed


def test_pretrain_vision_steps_through_the_loss_scaler(monkeypatch, tmp_path):
    import data

    data.build_world(str(tmp_path), train_scenes=6, val_scenes=1, test_scenes=1, paths_per_question=2)
    tok = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = VLM(get_config("tiny", vocab_size=tok.get_vocab_size(), image_token_id=data.special_ids(tok)["image"]))
    calls = []
    real = common.make_scaler

    def spy(device, precision):
        scaler = real(device, precision)
        scale = scaler.scale
        scaler.scale = lambda loss: calls.append("scale") or scale(loss)
        return scaler

    monkeypatch.setattr(common, "make_scaler", spy)
    rows = [r for r in data.read_jsonl(str(tmp_path / "base.jsonl")) if r["task"] == "describe"]
    train_sft.pretrain_vision(model, rows, [], str(tmp_path), train_sft.TrainConfig(device="cpu"), steps=3, batch_size=4)
    assert calls == ["scale"] * 3  # under fp16 that scaler is active; the same code runs for every precision


def test_the_run_precision_reaches_decoding(monkeypatch):
    seen = []
    monkeypatch.setattr(agents, "generate", lambda *a, **kw: seen.append(kw["dtype"]) or [[] for _ in a[1]])
    monkeypatch.setattr(agents.data, "render_conversation", lambda *a, **kw: ([5, 6], [0, 0]))
    monkeypatch.setattr(agents.data, "special_ids", lambda tok: {"eou": 1, "pad": 0})
    vlm = micro_model().eval()
    vlm.tokenizer = SimpleNamespace(decode=lambda ids: "")
    agents.complete(vlm, [[{"role": "user", "content": "q"}]], None, 4, precision="bf16")
    rows = [{"image": "x.png", "question": "q", "answer": "a"}]
    monkeypatch.setattr(agents, "batches", lambda rows, *a, **kw: iter([(rows, torch.zeros(1, 3, 32, 32))]))
    evaluation.predict("direct", [vlm], rows, ".", precision="bf16")
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_the_main_job_evaluates_on_its_own_device_and_precision(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(train_dpo, "build_missing_stages", lambda cfg: None)
    monkeypatch.setattr(train_dpo.data, "read_jsonl", lambda *a, **kw: [])
    monkeypatch.setattr(VLM, "from_pretrained", staticmethod(lambda path, dtype=None: micro_model()))
    monkeypatch.setattr(evaluation, "evaluate_two_agent",
                        lambda *a, **kw: seen.setdefault("val", kw) and {"chain_correct": 0.5, "overall": 0.5})
    monkeypatch.setattr(evaluation, "run_eval", lambda *a, **kw: seen.setdefault("test", kw))
    train_dpo.main(["--out", str(tmp_path), "--iters", "0", "--device", "cpu", "--precision", "fp32"])
    assert seen["test"]["device"] == torch.device("cpu") and seen["test"]["precision"] == "fp32"
    assert seen["val"]["precision"] == "fp32"


def test_resume_state_holds_only_the_training_device_generator(tmp_path, monkeypatch):
    def no_other_gpus(*a, **kw):
        raise AssertionError("the RNG state of every visible GPU is not saved")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_other_gpus)
    model = micro_model()
    cfg = loop_config(max_steps=1)
    train_sft.train_loop(model, synthetic_examples(model, 4), [], cfg, str(tmp_path), str(tmp_path / "log.jsonl"), "t")
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["rng_cuda"] is None  # a CPU run: no GPU generator at all
    checkpoint.load_train_state(str(tmp_path / "train_state.pt"), model, train_sft.make_optimizer(model, cfg),
                                common.make_scaler("cpu", "fp32"), checkpoint.provenance(cfg, cfg.out, []))


# ----------------------------------------------------------------------------------------------
# Reads back to the host: every one stalls a GPU until its queue has run


READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")
PROJECT = {str(p) for p in pathlib.Path(__file__).resolve().parent.parent.glob("*.py")}


@contextlib.contextmanager
def counting_reads(monkeypatch, host_side=()):
    """Count the reads of tensor values (item, tolist, bool(), int(), float(), nonzero) that the project's own code
    makes, but in the functions named in host_side, which read tensors that never leave the host. torch's internals
    are left out: on the CPU they read host-side counters, such as an optimizer's step."""
    count = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, **kw):
            caller = sys._getframe(1).f_code
            count["n"] += caller.co_filename in PROJECT and caller.co_name not in host_side
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield count
    monkeypatch.undo()


def test_one_read_per_training_step(monkeypatch, tmp_path):
    # Batches are built (and counted) on the host first; a step then reads its loss and grad norm in one transfer.
    common.matmul_peak(torch.device("cpu"), "fp32")  # measured once per process (cached): not a step's read
    reads = {}
    for steps in (2, 6):
        model = micro_model()
        examples = synthetic_examples(model, 8)
        cfg = loop_config(max_steps=steps, grad_accum=2)
        # The step's rows are shuffled (step_batches) and counted (collate) on the host, before they move.
        with counting_reads(monkeypatch, host_side=("step_batches", "collate")) as count:
            train_sft.train_loop(model, examples, [], cfg, str(tmp_path / str(steps)), str(tmp_path / f"{steps}.jsonl"),
                                 "t")
        reads[steps] = count["n"]
    assert reads[6] - reads[2] == 4  # 4 more steps, one read each: the loss and the grad norm together


def test_one_read_per_dpo_step(monkeypatch):
    pairs = host_side_pairs(monkeypatch, micro_model(), 4)
    reads = {}
    for epochs in (1, 3):  # 2 steps per epoch: the reads that grow with the steps are the per-step ones
        cfg = train_dpo.DPOConfig(batch_size=2, precision="fp32", lr=1e-5, epochs=epochs)
        policy = micro_model()
        with counting_reads(monkeypatch) as count:
            train_dpo.dpo_round(policy, pairs, cfg, torch.device("cpu"), lambda record: None, 1, ".")
        reads[epochs] = count["n"]
        pairs = host_side_pairs(monkeypatch, policy, 4)  # counting_reads undid the patches
    assert reads[3] - reads[1] == 4  # 4 more steps, one read each


def test_decoding_reads_back_every_few_steps(monkeypatch):
    vlm = micro_model().eval()
    prompts = [[5, 6, 7], [8, 9]]
    reads = {}
    for steps in (generate.CHECK_EVERY, 5 * generate.CHECK_EVERY):
        with counting_reads(monkeypatch) as count:
            out = generate.generate(vlm, prompts, max_new_tokens=steps, temperature=1.0, num_samples=2, seed=0)
        assert [len(row) for row in out] == [steps] * 4  # no stop id: every row runs to the limit
        reads[steps] = count["n"]
    assert reads[5 * generate.CHECK_EVERY] - reads[generate.CHECK_EVERY] == 4  # one per CHECK_EVERY steps


def test_batches_travel_from_pinned_memory_on_cuda(monkeypatch):
    batch = make_batch(micro_model(), [[11, 12], [13, 14, 15]])
    pinned, moved = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(1) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: moved.append(kw.get("non_blocking")) or self)
    out = train_sft.to_device(batch, torch.device("cuda"))
    monkeypatch.undo()
    assert set(out) == {"input_ids", "targets", "pixel_values"}  # no attention_mask, no host-side counts
    assert len(pinned) == 3 and moved == [True] * 3


def test_cuda_settings_tf32_fused_adamw_and_dynamic_compile(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # a property of torch's backend module: set and restored by hand, not patched
    try:
        matmul.fp32_precision = "ieee"
        assert common.resolve_device("cuda") == torch.device("cuda")
        assert matmul.fp32_precision == "tf32"  # fp32 matmuls on the tensor cores
    finally:
        matmul.fp32_precision = before
    monkeypatch.undo()
    kwargs = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: kwargs.append(kw) or real_adamw(*a, **kw))
    model = micro_model()
    train_sft.make_optimizer(model, loop_config())  # CPU parameters: the default implementation
    model.configure_optimizers(0.1, 1e-3, 1e-3, 1e-3, fused=True)  # what configure_optimizers picks on CUDA
    assert [kw["fused"] for kw in kwargs] == [None, True]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or m)
    train_sft.train_loop(model, synthetic_examples(model, 4), [], loop_config(max_steps=1, compile=True), str(tmp_path),
                         str(tmp_path / "log.jsonl"), "t")
    assert compiled == [{"dynamic": True}]  # batches padded to their own length do not recompile
