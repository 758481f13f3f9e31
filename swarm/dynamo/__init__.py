"""Dynamo integration: fetch the files of a ModelDeploymentCard through the swarm
(:mod:`swarm.dynamo.card`, ``swarm.fetch_card``) and follow Dynamo's discovery
(:mod:`swarm.dynamo.watch`). Nothing here imports Dynamo itself."""
