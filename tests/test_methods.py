"""The distillation methods compute exactly the losses of METHOD.md and train what they should."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from distill.data import MultiViewImages, list_images, moco_v2_augmentation
from distill.losses import consistency_mse, info_nce, seed_loss
from distill.methods import SEED, DisCo, MoCoV2, Retro
from distill.queue import EmbeddingQueue
from retro_transfer.checkpoints import load_teacher
from retro_transfer.models import build_student, build_teacher


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
    # squared distances per sample: 0.4^2 + 0.8^2 = 0.8, and 0
    assert consistency_mse(student, teacher, "batch_mean").item() == pytest.approx(0.4)
    assert consistency_mse(student, teacher, "sum").item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="batch_mean"):
        consistency_mse(student, teacher, "mean")


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


def test_retro_loss_equals_its_formula(teacher):
    torch.manual_seed(0)
    method = Retro(build_student("resnet18"), teacher, queue_size=8, momentum=0.9).train()
    x1, x2 = _views()
    queue = method.queue.snapshot()
    # BN in train mode normalises per call, so the reference calls the modules in the same order.
    reference = copy.deepcopy(method)

    def embed(fmap):
        return _unit(reference.teacher.head(reference.adapter(fmap).mean(dim=(2, 3))))

    with torch.no_grad():
        q = embed(reference.student(x1))
        q2 = embed(reference.student(x2))  # view 2: the released code wrongly uses x1 here
        k = _expected_key(reference.student_ema, reference.student, 0.9, embed, x2)
    t1, t2 = _teacher_embedding(teacher, x1), _teacher_embedding(teacher, x2)
    expected_nce = info_nce(q, k, queue, 0.2)
    expected_mse1 = ((q - t1) ** 2).sum(1).mean()
    expected_mse2 = ((q2 - t2) ** 2).sum(1).mean()

    out = method(x1, x2)
    torch.testing.assert_close(out["infonce"], expected_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse1"], expected_mse1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse2"], expected_mse2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), expected_nce + expected_mse1 + expected_mse2, rtol=1e-5, atol=1e-6)
    # The second term really compares view 2 with view 2: with view 1 it would differ.
    assert not torch.allclose(expected_mse2, ((q - t2) ** 2).sum(1).mean())


def test_disco_loss_equals_its_formula(teacher):
    torch.manual_seed(0)
    method = DisCo(build_student("resnet18"), teacher, head_hidden=64, queue_size=8, momentum=0.9).train()
    x1, x2 = _views()
    queue = method.queue.snapshot()
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


def test_seed_loss_equals_its_formula_and_queues_teacher_embeddings(teacher):
    torch.manual_seed(0)
    method = SEED(build_student("resnet18"), teacher, queue_size=8, teacher_temperature=0.05).train()
    x1, _ = _views()
    queue = method.queue.snapshot()
    reference = copy.deepcopy(method)
    with torch.no_grad():
        s = _unit(reference.head(reference.student(x1).mean(dim=(2, 3))))
    t = _teacher_embedding(teacher, x1)
    expected = seed_loss(s, t, queue, 0.2, 0.05)
    torch.testing.assert_close(method(x1, None)["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.embeddings[:4], t)


# -- Retro's invariants -------------------------------------------------------------------


def test_retro_trains_only_student_and_adapter_and_freezes_teacher(teacher):
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


def test_queue_is_fifo():
    queue = EmbeddingQueue(size=6, dim=2)
    batches = [F.normalize(torch.randn(2, 2), dim=1) for _ in range(4)]
    for batch in batches[:3]:
        queue.enqueue(batch)
    torch.testing.assert_close(queue.embeddings, torch.cat(batches[:3]))
    assert int(queue.ptr) == 0
    queue.enqueue(batches[3])  # overwrites the oldest batch only
    torch.testing.assert_close(queue.embeddings, torch.cat([batches[3], batches[1], batches[2]]))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        queue.enqueue(torch.randn(4, 2))


def test_official_moco_v2_head_is_reused_exactly(tmp_path):
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
    trial.queue.embeddings.copy_(queue)
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
    queue = method.queue.snapshot()
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
