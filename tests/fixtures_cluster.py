# fixtures for the local control plane (owned by the cluster work)
