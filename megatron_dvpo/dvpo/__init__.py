"""DVPO policy-optimisation maths: advantage estimators, KL control and the PPO-style losses."""
