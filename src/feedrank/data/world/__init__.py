"""The synthetic news-feed world: config, ground truth and response model, logging policy.

``feedrank.data.simulate`` streams a log out of it; the A/B simulator and quality benchmarks use
``World.respond`` and ``World.true_affinity`` directly.
"""

from feedrank.data.world.config import PolicyConfig, ResponseConfig, WorldConfig
from feedrank.data.world.policy import LoggingPolicy
from feedrank.data.world.world import Outcomes, World, load_world

__all__ = ["LoggingPolicy", "Outcomes", "PolicyConfig", "ResponseConfig", "World", "WorldConfig", "load_world"]
