"""Reinforcement learning: the Gymnasium environment, rewards, reference trajectories, PPO
training with its kick-start, episodes, W&B logging, and the SmartFRZ predictor's offline
training."""
