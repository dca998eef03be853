"""The distillation methods compute exactly the losses of METHOD.md and train what they should."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from distill.data import MultiViewImages, list_images, moco_v2_augmentation
from distill.losses import consistency_mse, info_nce, seed_loss, similarity_logits
from distill.methods.base import unit
from distill.methods import METHODS, SEED, DisCo, MoCoV2, Retro
from distill.queue import EmbeddingQueue
from retro_transfer.teacher_loading import load_teacher
from retro_transfer.models import build_student, build_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distill"


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# -- the loss functions, on numbers worked out by hand ---------------------------------


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits = [q.k, q.n1, q.n2] / 0.5 = [1.2, 0, -2]; the positive is at index 0.
    expected = -math.log(_softmax([1.2, 0.0, -2.0])[0])
    assert info_nce(q, k, queue, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_seed_loss_hand_computed():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0]])
    # student: [s.t, s.n] / 0.5 = [1.2, 0]; teacher: [t.t, t.n] / 0.25 = [4, 3.2]
    p_teacher = _softmax([4.0, 3.2])
    log_p_student = [math.log(p) for p in _softmax([1.2, 0.0])]
    expected = -sum(pt * ls for pt, ls in zip(p_teacher, log_p_student))
    assert seed_loss(s, t, queue, 0.5, 0.25).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_mse_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # squared distances per sample: 0.4^2 + 0.8^2 = 0.8, and 0; their mean over the images
    assert consistency_mse(student, teacher).item() == pytest.approx(0.4)


# -- the methods, recomputed from their parts --------------------------------------------

SIZE = 32


def _views(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=g), torch.randn(batch, 3, SIZE, SIZE, generator=g)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return build_teacher("resnet18")


def _unit(x):
    return F.normalize(x.float(), dim=1)


def _teacher_embedding(teacher, x):
    with torch.no_grad():
        return _unit(teacher.head(teacher.backbone(x)))


def _expected_key(mean_student, online_student, momentum, embed, x2):
    """k from a copy of the mean student advanced by one EMA step, as the method must."""
    mean = copy.deepcopy(mean_student)
    with torch.no_grad():
        for pm, po in zip(mean.parameters(), online_student.parameters()):
            pm.mul_(momentum).add_(po, alpha=1 - momentum)
        return embed(mean(x2))


def _drift(*online_modules, scale=0.05):
    """Move the online weights away from their mean copies.

    Right after construction the mean copies equal the online weights, so an
    EMA step is a no-op and a reference that skipped it (or a method whose mean
    head never updates) would compute the same keys.
    """
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for module in online_modules:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_moco_v2_loss_equals_its_formula():
    torch.manual_seed(0)
    method = MoCoV2(build_student("resnet18"), head_hidden=64, queue_size=8, momentum=0.9).train()
    _drift(method.student, method.head)
    x1, x2 = _views()
    queue = method.queue.negatives().clone()
    reference = copy.deepcopy(method)
    with torch.no_grad():
        q = _unit(reference.head(reference.student(x1).mean(dim=(2, 3))))
        for pm, po in zip(reference.head_ema.parameters(), reference.head.parameters()):
            pm.mul_(0.9).add_(po, alpha=0.1)
        k = _expected_key(
            reference.student_ema, reference.student, 0.9, lambda f: _unit(reference.head_ema(f.mean(dim=(2, 3)))), x2
        )
    torch.testing.assert_close(method(x1, x2)["loss"].detach(), info_nce(q, k, queue, 0.2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.negatives()[:4], k, rtol=1e-4, atol=1e-5)  # k is what was enqueued


@pytest.mark.parametrize("adapter_ema", [True, False])
def test_retro_loss_equals_its_formula(teacher, adapter_ema):
    """k goes through the mean adapter A' = EMA(A) (adapter_ema) or through the online adapter A (the other reading)."""
    torch.manual_seed(0)
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9, adapter_ema=adapter_ema).train()
    _drift(method.student, method.adapter)  # the mean adapter then differs from the online one
    x1, x2 = _views()
    queue = method.queue.negatives().clone()
    # BN in train mode normalises per call, so the reference calls the modules in the same order.
    reference = copy.deepcopy(method)

    def embed(fmap, adapter=reference.adapter):
        return _unit(reference.teacher.head(adapter(fmap).mean(dim=(2, 3))))

    with torch.no_grad():
        q = embed(reference.student(x1))
        q2 = embed(reference.student(x2))  # view 2: the released code wrongly uses x1 here
        key_adapter = reference.adapter
        if adapter_ema:
            key_adapter = reference.adapter_ema
            for pm, po in zip(key_adapter.parameters(), reference.adapter.parameters()):
                pm.mul_(0.9).add_(po, alpha=0.1)
        k = _expected_key(reference.student_ema, reference.student, 0.9, lambda f: embed(f, key_adapter), x2)
    t1, t2 = _teacher_embedding(teacher, x1), _teacher_embedding(teacher, x2)
    expected_nce = info_nce(q, k, queue, 0.2)
    expected_mse1 = ((q - t1) ** 2).sum(1).mean()
    expected_mse2 = ((q2 - t2) ** 2).sum(1).mean()

    out = method(x1, x2)
    torch.testing.assert_close(out["infonce"], expected_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse1"], expected_mse1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse2"], expected_mse2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), expected_nce + expected_mse1 + expected_mse2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.negatives()[:4], k, rtol=1e-4, atol=1e-5)
    # The second term really compares view 2 with view 2: with view 1 it would differ.
    assert not torch.allclose(expected_mse2, ((q - t2) ** 2).sum(1).mean())


def test_disco_loss_equals_its_formula(teacher):
    torch.manual_seed(0)
    method = DisCo(build_student("resnet18"), teacher, head_hidden=64, queue_size=8, momentum=0.9).train()
    _drift(method.student, method.head)
    x1, x2 = _views()
    queue = method.queue.negatives().clone()
    reference = copy.deepcopy(method)
    with torch.no_grad():
        q = _unit(reference.head(reference.student(x1).mean(dim=(2, 3))))
        q2 = _unit(reference.head(reference.student(x2).mean(dim=(2, 3))))
        for pm, po in zip(reference.head_ema.parameters(), reference.head.parameters()):
            pm.mul_(0.9).add_(po, alpha=0.1)
        k = _expected_key(
            reference.student_ema, reference.student, 0.9, lambda f: _unit(reference.head_ema(f.mean(dim=(2, 3)))), x2
        )
    t1, t2 = _teacher_embedding(teacher, x1), _teacher_embedding(teacher, x2)
    expected = info_nce(q, k, queue, 0.2) + ((q - t1) ** 2).sum(1).mean() + ((q2 - t2) ** 2).sum(1).mean()
    torch.testing.assert_close(method(x1, x2)["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.negatives()[:4], k, rtol=1e-4, atol=1e-5)


def test_seed_loss_equals_its_formula_and_queues_teacher_embeddings(teacher):
    torch.manual_seed(0)
    method = SEED(build_student("resnet18"), teacher, queue_size=8, teacher_temperature=0.05).train()
    x1, _ = _views()
    queue = method.queue.negatives().clone()
    reference = copy.deepcopy(method)
    with torch.no_grad():
        s = _unit(reference.head(reference.student(x1).mean(dim=(2, 3))))
    t = _teacher_embedding(teacher, x1)
    expected = seed_loss(s, t, queue, 0.2, 0.05)
    torch.testing.assert_close(method(x1, None)["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.negatives()[:4], t)


# -- Retro's invariants -------------------------------------------------------------------


@pytest.mark.exact
def test_retro_trains_only_student_and_adapter_and_freezes_teacher(teacher):
    """Exact on any CPU: a frozen teacher in eval mode is never written to, so its tensors keep their values bit for bit."""
    torch.manual_seed(0)
    frozen = copy.deepcopy(teacher.state_dict())
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9).train()
    assert not method.teacher.training, "the teacher keeps its running BN statistics"
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        x1, x2 = _views(seed=step)
        optimizer.zero_grad()
        method(x1, x2)["loss"].backward()
        with_grad = {name.split(".")[0] for name, p in method.named_parameters() if p.grad is not None}
        assert with_grad == {"student", "adapter"}
        assert all(p.grad is not None for name, p in method.named_parameters() if name.startswith(("student.", "adapter.")))
        optimizer.step()
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), f"teacher tensor {key} changed"
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for n, p in method.named_parameters() if n.startswith(("student.", "adapter."))}


def test_mean_student_follows_the_ema_formula(teacher):
    torch.manual_seed(0)
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9).train()
    with torch.no_grad():  # make the online and mean students differ
        for p in method.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before_mean = [p.clone() for p in method.student_ema.parameters()]
    online = [p.clone() for p in method.student.parameters()]
    method(*_views())
    for after, old, live in zip(method.student_ema.parameters(), before_mean, online):
        torch.testing.assert_close(after, 0.9 * old + 0.1 * live)


def _adapter_bns(adapter):
    return [m for m in adapter.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_retro_key_adapter_is_the_ema_of_the_online_adapter(teacher):
    """After two SGD steps: A' = m^2 A_0 + m(1-m) A_0 + (1-m) A_1, each step averaging the online adapter it started from."""
    torch.manual_seed(0)
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9).train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    expected = [p.detach().clone() for p in method.adapter_ema.parameters()]
    for step in range(2):
        online = [p.detach().clone() for p in method.adapter.parameters()]
        optimizer.zero_grad()
        method(*_views(seed=step))["loss"].backward()
        optimizer.step()
        expected = [0.9 * e + 0.1 * o for e, o in zip(expected, online)]
    assert not any(p.requires_grad for p in method.adapter_ema.parameters()), "the mean adapter is not trained"
    for got, want in zip(method.adapter_ema.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    moved = max((a - b).abs().max().item() for a, b in zip(method.adapter.parameters(), method.adapter_ema.parameters()))
    assert moved > 1e-4, "the online adapter must have moved away from its average for this to test anything"


def test_retro_without_adapter_ema_sends_keys_through_the_online_adapter(teacher):
    """adapter.ema=false: no averaged adapter exists (nor in checkpoints); the key view's features go through A."""
    method = Retro(build_student("resnet18"), teacher, queue_size=8, adapter_ema=False)
    assert method.adapter_ema is None and method.key_adapter is method.adapter
    assert not any(k.startswith("adapter_ema.") for k in method.state_dict())
    averaged = Retro(build_student("resnet18"), teacher, queue_size=8)
    assert averaged.key_adapter is averaged.adapter_ema
    assert {k.removeprefix("adapter_ema.") for k in averaged.state_dict() if k.startswith("adapter_ema.")} == set(
        averaged.adapter.state_dict()
    )


@pytest.mark.parametrize("adapter_ema", [True, False])
def test_retro_online_adapter_bn_statistics_move_only_in_its_own_passes(teacher, adapter_ema):
    """The online adapter's BN running statistics (what adapter-feature evaluation reads) come from q and q2 only.

    With the averaged adapter, the key pass (two split-BN sub-batches here)
    runs through A' and leaves A's statistics as two passes, on S(x1) and
    S(x2), make them. Without it the key pass updates them twice more.
    """
    torch.manual_seed(0)
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9, bn_splits=2,
                   adapter_ema=adapter_ema).train()
    reference = copy.deepcopy(method)
    x1, x2 = _views(batch=8)
    method(x1, x2)
    with torch.no_grad():
        for view in (x1, x2):
            reference.adapter(reference.student(view))
    ours, passes = _adapter_bns(method.adapter), _adapter_bns(reference.adapter)
    assert ours and all(int(bn.num_batches_tracked) == (2 if adapter_ema else 4) for bn in ours)
    gap = max((a.running_mean - b.running_mean).abs().max().item() for a, b in zip(ours, passes))
    if adapter_ema:
        # Same operations on the same shapes: float32 rounding only (the statistics are O(1)).
        assert gap < 1e-5
    else:
        assert gap > 1e-3, "the key passes must have moved the online statistics"
    if adapter_ema:
        key_passes = [int(bn.num_batches_tracked) for bn in _adapter_bns(method.adapter_ema)]
        assert set(key_passes) == {2}, "A' normalised the 2 key sub-batches"


def test_queue_is_fifo():
    queue = EmbeddingQueue(size=6, dim=2)
    batches = [F.normalize(torch.randn(2, 2), dim=1) for _ in range(4)]
    for batch in batches[:3]:
        queue.enqueue(batch)
    torch.testing.assert_close(queue.negatives(), torch.cat(batches[:3]))
    assert int(queue.ptr) == 0
    queue.enqueue(batches[3])  # overwrites the oldest batch only
    torch.testing.assert_close(queue.negatives(), torch.cat([batches[3], batches[1], batches[2]]))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        queue.enqueue(torch.randn(4, 2))


@pytest.mark.exact
def test_official_moco_v2_head_is_reused_exactly(tmp_path):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in net.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"arch": "resnet18", "epoch": 200, "state_dict": state}, path)
    loaded, _ = load_teacher(path, require_head=True)
    method = Retro(build_student("resnet18"), loaded, queue_size=8)
    assert torch.equal(method.teacher.head[0].weight, state["module.encoder_q.fc.0.weight"])
    assert torch.equal(method.teacher.head[2].bias, state["module.encoder_q.fc.2.bias"])
    assert torch.equal(method.teacher.backbone.layer4[1].conv2.weight, state["module.encoder_q.layer4.1.conv2.weight"])


def test_retro_refuses_a_teacher_without_head():
    with pytest.raises(ValueError, match="projection head"):
        Retro(build_student("resnet18"), build_teacher("resnet18", with_head=False))


# -- every method learns on the shapes data -----------------------------------------------


def _probe_loss(method, queue, probe):
    """The method's loss on fixed views against a fixed queue, on a throw-away copy."""
    trial = copy.deepcopy(method)
    trial.queue.negatives().copy_(queue)
    with torch.no_grad():
        return trial(*probe)["loss"].item()


@pytest.mark.parametrize("name", ["moco_v2", "seed", "disco", "retro"])
def test_each_method_loss_falls_on_shapes(name, shapes_root, teacher):
    torch.manual_seed(0)
    files = list_images(shapes_root / "unlabeled")
    data = MultiViewImages(files, moco_v2_augmentation(SIZE), views=2, seed=0)
    batch = 8

    def views(step):
        epoch, within = divmod(step, len(files) // batch)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(epoch))
        items = [data[(int(i), epoch)] for i in order[within * batch : (within + 1) * batch]]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    student = build_student("resnet18")
    method = {
        "moco_v2": lambda: MoCoV2(student, queue_size=16, momentum=0.99),
        "seed": lambda: SEED(student, teacher, queue_size=16),
        "disco": lambda: DisCo(student, teacher, head_hidden=256, queue_size=16, momentum=0.99),
        "retro": lambda: Retro(student, teacher, queue_size=16, momentum=0.99),
    }[name]().train()
    probe = views(0)
    queue = method.queue.negatives().clone()
    before = _probe_loss(method, queue, probe)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9)
    for step in range(24):
        loss = method(*views(step))["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _probe_loss(method, queue, probe)
    assert after < 0.9 * before, f"{name}: probe loss {before:.4f} -> {after:.4f}"


# -- one process: split BN for the key encoder ---------------------------------------------


def test_split_bn_encodes_the_shuffled_keys_in_sub_batches():
    """With bn_splits=2 in one process, k = unshuffle(cat(E(sub-batch) for each sub-batch of shuffle(x2))).

    The key encoder then normalises each half with that half's statistics, as
    two processes of MoCo's shuffle BN would, instead of with the query's batch.
    """
    torch.manual_seed(0)
    method = MoCoV2(build_student("resnet18"), head_hidden=64, queue_size=16, momentum=0.9, bn_splits=2).train()
    x1, x2 = _views(batch=8)
    reference = copy.deepcopy(method)
    embed = lambda f: _unit(reference.head_ema(f.mean(dim=(2, 3))))  # noqa: E731
    torch.manual_seed(7)
    method(x1, x2)
    torch.manual_seed(7)
    order = torch.randperm(8)
    with torch.no_grad():
        for pm, po in zip(reference.head_ema.parameters(), reference.head.parameters()):
            pm.mul_(0.9).add_(po, alpha=0.1)
        for pm, po in zip(reference.student_ema.parameters(), reference.student.parameters()):
            pm.mul_(0.9).add_(po, alpha=0.1)
        halves = [embed(reference.student_ema(part)) for part in x2[order].chunk(2)]
        whole = embed(reference.student_ema(x2))
    expected = torch.cat(halves)[torch.argsort(order)]
    keys = method.queue.negatives()[:8]
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    assert (keys - whole).abs().max() > 1e-3, "split BN must differ from one batch's statistics"


# -- precision: losses in float32 under autocast -------------------------------------------


def _unit_rows(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_logits_under_bf16_autocast_equal_float32():
    """SEED's teacher logits at tau_T = 0.01: bf16 rounding of t.queue (~0.004) would move them by up to ~0.3."""
    t, queue = _unit_rows(16, 128, 0), _unit_rows(4096, 128, 1)
    queue[:16] = F.normalize(t + 0.05 * _unit_rows(16, 128, 2), dim=1)  # near-duplicates: the logits that matter
    fp32 = similarity_logits(t, t, queue, 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = similarity_logits(t, t, queue, 0.01)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max().item() < 1e-3


@pytest.mark.parametrize("tau_teacher", [0.01, 1e-4])
def test_losses_under_bf16_autocast_equal_float32(tau_teacher):
    """Networks may run in bf16, the losses may not: SEED's logits / 0.01 in bf16 are off by ~0.3."""
    # Trained embeddings are close to one another (the case that matters): rows near a few centres.
    centres = _unit_rows(4, 128, 0)
    near = lambda n, seed: F.normalize(centres[torch.arange(n) % 4] + 0.1 * _unit_rows(n, 128, seed), dim=1)  # noqa: E731
    q, k, t, queue = near(16, 1), near(16, 2), near(16, 3), near(4096, 4)
    fp32 = (info_nce(q, k, queue, 0.2), seed_loss(q, t, queue, 0.2, tau_teacher), consistency_mse(q, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = (info_nce(q, k, queue, 0.2), seed_loss(q, t, queue, 0.2, tau_teacher), consistency_mse(q, t))
        normalised = unit(torch.randn(4, 8))
    for name, a, b in zip(("infonce", "seed", "mse"), fp32, bf16):
        assert b.dtype == torch.float32, name
        assert abs(a.item() - b.item()) < 1e-3, f"{name}: fp32 {a.item():.6f} vs bf16 autocast {b.item():.6f}"
    assert normalised.dtype == torch.float32


def test_seed_step_under_bf16_autocast_scores_in_float32(teacher):
    """A whole SEED step under CPU bf16 autocast: its loss equals the float32 loss of the embeddings it made."""
    torch.manual_seed(0)
    method = SEED(build_student("resnet18"), teacher, queue_size=8, teacher_temperature=0.01).train()
    x1, _ = _views()
    queue = method.queue.negatives().clone()
    captured = {}
    method.head.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(x1, None)["loss"]
    t = method.queue.negatives()[:4].clone()  # the teacher embeddings the step enqueued
    expected = seed_loss(_unit(captured["s"].float()), t, queue, 0.2, 0.01)
    assert abs(loss.item() - expected.item()) < 1e-3


# -- the queue is scored in place, never copied ---------------------------------------------


def test_a_step_allocates_no_copy_of_the_queue_and_keeps_exact_gradients():
    """No tensor of the queue's size is made in a step (MoCo's clone() is 32 MiB a step at K = 65536).

    The keys enter the queue at the next read, so backward still sees the
    negatives the step scored against: the gradients equal those of a step
    that scored a copy.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class QueueSizedAllocations(TorchDispatchMode):
        """Names of the ops whose output is a new tensor as large as the queue (views of it do not count)."""

        def __init__(self, queue):
            super().__init__()
            self.queue = queue  # held, so that no new tensor can take its freed address
            self.shapes, self.storage = {tuple(queue.shape), tuple(queue.t().shape)}, queue.untyped_storage().data_ptr()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and tuple(t.shape) in self.shapes and t.untyped_storage().data_ptr() != self.storage:
                    self.ops.append(str(func))
            return out

    torch.manual_seed(0)
    method = MoCoV2(build_student("resnet18"), head_hidden=64, queue_size=4096, momentum=0.9).train()
    twin = copy.deepcopy(method)
    x1, x2 = _views()
    method(x1, x2)  # a first step leaves keys waiting to be written
    twin(x1, x2)
    x1, x2 = _views(seed=1)
    with QueueSizedAllocations(method.queue.embeddings) as seen:
        loss = method(x1, x2)["loss"]
        loss.backward()
    assert not seen.ops, f"the step made queue-sized copies: {seen.ops}"

    # The reference scores the same queue through a copy, then enqueues.
    negatives = twin.queue.negatives().clone()
    q = unit(twin.head(twin.student(x1).mean(dim=(2, 3))))
    with torch.no_grad():
        twin(x1, x2)  # advances the twin's mean student and queue exactly as the method did
    k = twin.queue._pending
    info_nce(q, k, negatives, 0.2).backward()
    for (name, a), b in zip(method.named_parameters(), twin.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "method, overrides, hidden",
    [("moco_v2", [], 512), ("seed", [], 512), ("disco", [], 2048), ("moco_v2", ["student.head_hidden=256"], 256)],
)  # fmt: skip
def test_each_method_builds_itself_from_the_config(method, overrides, hidden, teacher):
    """A method reads its own keys: the student head's width (DisCo's wide default), the queue, the temperatures."""
    from distill.config import load_config

    cfg = load_config(
        CONFIGS / f"shapes_{method}_effb0.yaml",
        ["student.arch=resnet18", "loss.queue_size=64", "loss.temperature=0.3", *overrides],
        check_paths=False,
    )
    built = METHODS[method].from_config(cfg, build_student("resnet18"), None if method == "moco_v2" else teacher, 2)
    assert isinstance(built, METHODS[method])
    assert built.head.hidden_dim == hidden
    assert built.queue.negatives().shape[0] == 64 and built.temperature == 0.3


def test_retro_builds_itself_with_the_adapter_the_config_asks_for(teacher):
    from distill.config import load_config

    cfg = load_config(CONFIGS / "shapes_retro_effb0.yaml", ["student.arch=resnet18", "adapter.ema=false"], check_paths=False)
    built = Retro.from_config(cfg, build_student("resnet18"), teacher, 1)
    assert built.adapter_ema is None and type(built.adapter).__name__ == "BottleneckAdapter"
