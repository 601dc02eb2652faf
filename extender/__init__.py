"""The kube-scheduler extender: HTTP verbs, cluster state, bind."""
