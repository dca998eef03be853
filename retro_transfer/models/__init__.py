"""Networks: timm students, torchvision ResNet teachers, projection heads and adapters."""

from .adapters import build_adapter
from .heads import ProjectionHead
from .students import Student, build_student
from .teachers import TEACHER_ARCHS, Teacher, build_teacher

__all__ = ["Student", "build_student", "Teacher", "build_teacher", "TEACHER_ARCHS", "ProjectionHead", "build_adapter"]
