"""The RL algorithms (DVPO, the PPO baseline): pure maths (advantages, losses, estimators,
scoring views), the scorers, the shared update loop and step, and one module per algorithm."""
