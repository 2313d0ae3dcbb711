"""The controls, one file or folder each: its frozen config, its per-call state (`Bound`) and its layer hooks.

A control describes what it changes at a layer (`attnctl.processors.edit.Edit`); the processors and the
backends carry it out. Adding a control touches this folder, `attnctl/__init__.py` and the tests only
(docs/architecture.md walks through it).
"""
