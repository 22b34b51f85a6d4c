"""Behaviour policies for collecting datasets.

- ``policies``: the ``BehaviourPolicy`` interface, random / Stable-Baselines3 / SAC-actor policies
  and the SAC actor file format.
- ``scripted``: a scripted Pendulum-v1 controller and the quickstart's mixed-quality dataset.
- ``sac``: SAC behaviour agents (D4RL's recipe): training, snapshots, actor export, replay buffer.
"""

from dtlab.behaviour.policies import ActorPolicy, BehaviourPolicy, RandomPolicy, SB3Policy

__all__ = ["ActorPolicy", "BehaviourPolicy", "RandomPolicy", "SB3Policy"]
