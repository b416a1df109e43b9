"""A Qlik Cloud tenant stand-in (``butler-mqtt sim --cloud``): its own small world, like the
QRS simulator next to it; the product never imports it."""

from .server import CloudSimulator, LoggedRequest
from .world import SimApp, SimReload, SimSpace, SimTag, StartRecord, World, demo_world

__all__ = [
    "CloudSimulator", "LoggedRequest", "SimApp", "SimReload", "SimSpace", "SimTag", "StartRecord", "World",
    "demo_world",
]
