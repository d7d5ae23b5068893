-- Argo CD health check for mlflow-gateway.dev/GatewayEndpoint.
-- Reads what the operator writes: status.observedGeneration and the Ready condition (with its own
-- observedGeneration), the same fields kstatus reads. Uses only the libraries Argo CD opens for a
-- custom health check (base and table).
local hs = {}
local generation = obj.metadata and obj.metadata.generation

-- Ready=False reasons that mean "still converging" rather than "needs attention": the experiment
-- or the first gateway pods are on their way. While the pods roll out (condition Progressing=True),
-- Ready=False is converging too; a stuck rollout turns Progressing False (ProgressDeadlineExceeded).
local in_progress = {
  Progressing = true,
  Reconciling = true,
  WaitingForExperiment = true,
  DeploymentPending = true,
  RollingOut = true,
}

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the endpoint"
  return hs
end

local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end

local ready = nil
local rolling_out = false
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  elseif condition.type == "Progressing" and condition.status == "True" then
    rolling_out = true
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end

local detail = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.status == "False" and not in_progress[ready.reason or ""] and not rolling_out then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = detail
return hs
