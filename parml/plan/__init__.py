"""Scaling model: measured costs (``profile``, ``calibrate``), a discrete-event replay of parml's own
schedules, mesh and V-cycle (``simulate``), and a ranked list of layouts (``planner``)."""
