"""What is there: the observation (pods, Services, recorded revisions), the plan, the rollout state."""
