"""Scaling model: a machine's measured costs (``profile``; ``calibrate`` with ``calibrate_compute``
and ``calibrate_comm``), a discrete-event replay of parml's own schedules, mesh and V-cycle
(``simulate`` gathers ``costs``, ``programs``, ``vcycle``, ``engine``, ``sharing`` and ``predict``),
a ranked list of layouts (``planner``) and the glue for ``parml plan`` / ``--layout auto``
(``auto``)."""
