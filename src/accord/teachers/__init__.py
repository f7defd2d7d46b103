"""Generation backends (teachers, judges, students under evaluation) behind one protocol (see
:mod:`accord.teachers.base`)."""

from accord.teachers.base import (
                                  Generation,
                                  Generator,
                                  NotSupported,
                                  Request,
                                  SamplingParams,
                                  TeacherConfigError,
                                  TeacherUnavailable,
                                  load_generator,
)

__all__ = [
                                  "Generation",
                                  "Generator",
                                  "NotSupported",
                                  "Request",
                                  "SamplingParams",
                                  "TeacherConfigError",
                                  "TeacherUnavailable",
                                  "load_generator",
]
