"""A faithful stand-in for the Qlik Sense Repository Service (QRS), for tests and demos."""

from .app import serve
from .certs import CertPaths, ensure_certs
from .data import demo_tasks, generate_tasks, load_tasks_file
from .server import LoggedRequest, QrsSimulator
from .store import SimTask

__all__ = [
    "CertPaths",
    "LoggedRequest",
    "QrsSimulator",
    "SimTask",
    "demo_tasks",
    "ensure_certs",
    "generate_tasks",
    "load_tasks_file",
    "serve",
]
