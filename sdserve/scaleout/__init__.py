"""Scale-out on Ray Serve (issue 22): engine replicas behind the one sdserve.v1 front.

The front is the single server (server/app.py) unchanged except for where its engine thread
is: `dispatch.RayDispatcher` stands in for `EngineThread` and sends each validated, admitted
EngineRequest to a replica of the `replica.EngineReplica` deployment. Everything the front
already does (auth, tenants, cluster-wide admission, the registry, health, reflection, drain)
stays in one place; replicas only compute. Importing this package imports no Ray: `ray` is an
optional extra (`sdserve[ray]`) and is imported where a deployment is built.
"""
