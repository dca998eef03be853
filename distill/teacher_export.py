"""Write a MoCo v2 run on a ResNet in the official MoCo v2 release layout.

``tools/pretrain_teacher.py`` pretrains teachers with the same engine as the
students (method ``moco_v2``, a timm ResNet, whose parameter names are
torchvision's). Exporting to the released layout means a teacher made here and
one downloaded from the MoCo release go through the very same loader.
"""

from typing import Dict


from .common import TEACHER_ARCHS

#: The engine's methods whose runs are teachers: MoCo v2's network and head, trained without or with labels.
TEACHER_RECIPES = ("moco_v2", "supcon")


def to_moco_v2_release(ckpt: Dict) -> Dict:
    """``{"arch", "epoch", "recipe", "state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}``.

    ``recipe`` says how the teacher was trained (``supcon``: with labels), so
    that a report can state it; the loader does not need it.
    """
    arch = ckpt["student_arch"]
    if ckpt["method"] not in TEACHER_RECIPES or arch not in TEACHER_ARCHS:
        raise ValueError(
            f"only a {' or '.join(TEACHER_RECIPES)} run on a ResNet ({', '.join(TEACHER_ARCHS)}) can become a teacher; "
            f"this is a {ckpt['method']} run on {arch}"
        )
    renames = {"student.body.": "module.encoder_q.", "head.": "module.encoder_q.fc.",
               "student_ema.body.": "module.encoder_k.", "head_ema.": "module.encoder_k.fc."}
    state = {}
    for key, value in ckpt["model"].items():
        for old, new in renames.items():
            if key.startswith(old):
                state[new + key[len(old):]] = value
                break
    # MoCo keeps its queue as (dim, K) and the pointer as a 1-element tensor.
    state["module.queue"] = ckpt["model"]["queue.embeddings"].t().contiguous()
    state["module.queue_ptr"] = ckpt["model"]["queue.ptr"].reshape(1)
    return {"arch": arch, "epoch": int(ckpt["step"]), "recipe": ckpt["method"], "state_dict": state}
