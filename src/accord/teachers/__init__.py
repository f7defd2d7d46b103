"""Generation backends (teachers, judges, students under evaluation) behind one protocol (see
:mod:`accord.teachers.base`)."""

from accord.teachers.base import (
                                  Generation,
                                  NotSupported,
                                  Request,
                                  SamplingParams,
                                  Generator,
                                  TeacherConfigError,
                                  TeacherUnavailable,
                                  load_generator,
)

__all__ = ["Generation", "NotSupported", "Request", "SamplingParams", "Generator", "TeacherConfigError",
           "TeacherUnavailable", "load_generator"]
