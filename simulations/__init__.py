"""Virtual-time simulation of a swarm: the real transfer engine over flow-level simulated links.

``simulations.sim.Simulation`` runs one scenario with one seed under trio's ``MockClock``;
``simulations.cli`` is the ``swarm-sim`` command. This package never imports ``swarm.net`` or libp2p.
"""
