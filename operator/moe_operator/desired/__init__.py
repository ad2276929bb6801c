"""From a plan to objects: pods, Services, PrometheusRules, revision records, and the diff to apply."""
